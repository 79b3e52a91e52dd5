"""The end-of-run outputs: the loss span, which sample points the grid shows, the grid image and manifest (cell
placement, labels, missing cells) and the report's lines."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from library.engine.report import (
    LOSS_SPAN,
    LossSpan,
    RunReport,
    SamplePoint,
    SampleRecord,
    grid_points,
    sample_grid,
    write_report,
    write_sample_grid,
)
from library.generate.grid import HEADER_HEIGHT, HEADER_WIDTH
from library.sampling.generate import Sample
from library.sampling.prompts import SamplePrompt


def point(step: int, colours: dict[int, tuple[int, int, int]], folder: Path, size=(64, 64)) -> SamplePoint:
    """The samples of prompts ``colours`` (index: plain colour) at ``step``, written to ``folder`` as the sampler
    writes them, recorded the way the run records them."""
    records = []
    for i, colour in colours.items():
        image, path = Image.new("RGB", size, colour), folder / f"{step}_{i}.png"
        image.save(path)
        records.append(SampleRecord.of(Sample(image, path, SamplePrompt(i, f"prompt {i}"), 10 + i)))
    return SamplePoint(step, tuple(records))


def test_loss_span_keeps_the_first_and_last_steps():
    span = LossSpan()
    assert span.start is None and span.end is None
    for loss in range(1, 31):
        span.add(float(loss))
    assert span.first == [float(i) for i in range(1, LOSS_SPAN + 1)]
    assert span.start == 5.5 and span.end == 25.5


def test_grid_points_first_last_and_evenly_spaced_between():
    points = [SamplePoint(s, ()) for s in range(0, 1100, 100)]  # 11 points
    assert [p.step for p in grid_points(points, 6)] == [0, 200, 400, 600, 800, 1000]
    assert [p.step for p in grid_points(points[:4], 6)] == [0, 100, 200, 300]
    assert [p.step for p in grid_points(points[:3], 2)] == [0, 200]


def test_sample_grid_places_each_prompt_in_its_row_and_each_point_in_its_column(tmp_path):
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    points = [
        point(0, {0: red, 1: green}, tmp_path),
        point(50, {}, tmp_path),
        point(100, {0: blue}, tmp_path, (32, 64)),
    ]
    grid, manifest = sample_grid(points)
    assert grid.size == (HEADER_WIDTH + 2 * 64, HEADER_HEIGHT + 2 * 64)
    assert grid.getpixel((HEADER_WIDTH + 32, HEADER_HEIGHT + 32)) == red
    assert grid.getpixel((HEADER_WIDTH + 32, HEADER_HEIGHT + 64 + 32)) == green
    assert grid.getpixel((HEADER_WIDTH + 64 + 32, HEADER_HEIGHT + 32)) == blue  # 32 wide, centred in its cell
    assert grid.getpixel((HEADER_WIDTH + 64 + 4, HEADER_HEIGHT + 32)) == (255, 255, 255)
    assert grid.getpixel((HEADER_WIDTH + 64 + 32, HEADER_HEIGHT + 64 + 32)) == (255, 255, 255)  # no sample
    assert manifest == {
        "steps": [0, 100],
        "rows": [
            {
                "index": 0,
                "prompt": "prompt 0",
                "seed": 10,
                "samples": [
                    {"step": 0, "path": str(tmp_path / "0_0.png")},
                    {"step": 100, "path": str(tmp_path / "100_0.png")},
                ],
            },
            {
                "index": 1,
                "prompt": "prompt 1",
                "seed": 11,
                "samples": [{"step": 0, "path": str(tmp_path / "0_1.png")}, None],
            },
        ],
    }
    assert sample_grid([point(0, {0: red}, tmp_path)]) is None
    path = write_sample_grid(points, tmp_path / "sample", "run")
    assert path == tmp_path / "sample" / "run_grid.png" and Image.open(path).size == grid.size
    assert json.loads(path.with_suffix(".json").read_text()) == manifest
    assert sorted(p.name for p in path.parent.iterdir()) == ["run_grid.json", "run_grid.png"]


def test_report_lines_and_file(tmp_path):
    span = LossSpan()
    for loss in (0.5, 0.3, 0.1):
        span.add(loss)
    report = RunReport(
        steps=3, epochs=1, seconds=125.4, loss=span, model=Path("out/m.safetensors"), grid=Path("out/sample/g.png")
    )
    assert report.lines() == [
        "trained 3 steps in 1 epoch(s) in 2m05s",
        "loss: 0.3000 at the start, 0.3000 at the end (means of 3 steps)",
        "model:   out/m.safetensors",
        "grid:    out/sample/g.png",
    ]
    write_report(report, tmp_path / "r.txt")
    assert (tmp_path / "r.txt").read_text().splitlines() == [*report.lines(), f"report:  {tmp_path / 'r.txt'}"]
    assert RunReport(0, 0, 7.0, LossSpan(), Path("m")).lines() == ["trained 0 steps in 0 epoch(s) in 7s", "model:   m"]
