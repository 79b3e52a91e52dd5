"""What a finished run leaves its user: one comparison grid of the sample images (every prompt, at the first sample
point and each later one), its manifest, and a short text report (steps, time, loss at start and end, where every
output went), written beside the model and printed at the end."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from library.io import atomic_path, atomic_write_text

GRID_COLUMNS = 6
"""At most this many sample points go into the grid: the first, the last and evenly spaced ones between."""

LOSS_SPAN = 10
"""The report's start and end losses are the means of this many first and last steps."""


@dataclass
class LossSpan:
    """The first and the most recent ``LOSS_SPAN`` step losses of a run."""

    first: list[float] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=LOSS_SPAN))

    def add(self, loss: float) -> None:
        if len(self.first) < LOSS_SPAN:
            self.first.append(loss)
        self.recent.append(loss)

    @property
    def start(self) -> float | None:
        return sum(self.first) / len(self.first) if self.first else None

    @property
    def end(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


@dataclass(frozen=True)
class SampleRecord:
    """One sample image as the grid needs it: its prompt's index and text, its seed and its file. Only the path is
    kept, so a long run's samples are not held in memory; the grid reads the few it shows."""

    index: int
    prompt: str
    seed: int
    path: Path

    @classmethod
    def of(cls, sample: Any) -> SampleRecord:
        """The record of a ``library.sampling.generate.Sample``."""
        return cls(sample.prompt.index, sample.prompt.prompt, sample.seed, Path(sample.path))


@dataclass(frozen=True)
class SamplePoint:
    """The samples made at one step."""

    step: int
    samples: tuple[SampleRecord, ...]


def grid_points(points: Sequence[SamplePoint], limit: int = GRID_COLUMNS) -> list[SamplePoint]:
    """The sample points shown in the grid: all when there are at most ``limit``, else the first, the last and
    evenly spaced ones between."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    picks = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picks]


def _column_label(step: int) -> str:
    return "before training" if step == 0 else f"step {step}"


def sample_grid(points: Sequence[SamplePoint]) -> tuple[Image.Image, dict] | None:
    """One row per sample prompt, one column per sample point (``grid_points``), and a manifest of the files in
    each cell; None when fewer than two points were sampled. Cells of other sizes are centred on white."""
    from library.generate.grid import make_grid

    shown = grid_points([p for p in points if p.samples])
    if len(shown) < 2:
        return None
    rows = sorted({s.index for p in shown for s in p.samples})
    by_cell = {(s.index, column): s for column, p in enumerate(shown) for s in p.samples}
    images = {key: Image.open(record.path).convert("RGB") for key, record in by_cell.items()}
    width = max(image.width for image in images.values())
    height = max(image.height for image in images.values())
    cells, manifest_rows, labels = [], [], []
    for row in rows:
        line, files = [], []
        first = next(by_cell[(row, c)] for c in range(len(shown)) if (row, c) in by_cell)
        for column, point in enumerate(shown):
            cell = Image.new("RGB", (width, height), (255, 255, 255))
            sample, image = by_cell.get((row, column)), images.get((row, column))
            if image is not None:
                cell.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
            line.append(cell)
            files.append(None if sample is None else {"step": point.step, "path": str(sample.path)})
        cells.append(line)
        labels.append(f"{first.prompt} (seed {first.seed})")
        manifest_rows.append({"index": row, "prompt": first.prompt, "seed": first.seed, "samples": files})
    grid = make_grid(cells, [_column_label(p.step) for p in shown], labels)
    return grid, {"steps": [p.step for p in shown], "rows": manifest_rows}


def write_sample_grid(points: Sequence[SamplePoint], sample_dir: Path, output_name: str) -> Path | None:
    """``<sample_dir>/<output_name>_grid.png`` and its ``.json`` manifest (atomic writes); None without a grid."""
    made = sample_grid(points)
    if made is None:
        return None
    grid, manifest = made
    path = sample_dir / f"{output_name}_grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=1))
    return path


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


@dataclass(frozen=True)
class RunReport:
    """A finished run in a few lines: what it did and where its outputs are (None: not written)."""

    steps: int
    epochs: int
    seconds: float
    loss: LossSpan
    model: Path
    state: Path | None = None
    samples: Path | None = None
    grid: Path | None = None
    logs: Path | None = None

    def lines(self) -> list[str]:
        loss = self.loss
        lines = [f"trained {self.steps} steps in {self.epochs} epoch(s) in {_duration(self.seconds)}"]
        if loss.start is not None and loss.end is not None:
            span = min(LOSS_SPAN, len(loss.first))
            lines.append(f"loss: {loss.start:.4f} at the start, {loss.end:.4f} at the end (means of {span} steps)")
        outputs = [
            ("model", self.model),
            ("state", self.state),
            ("samples", self.samples),
            ("grid", self.grid),
            ("logs", self.logs),
        ]
        lines += [f"{name + ':':9}{path}" for name, path in outputs if path is not None]
        return lines


def write_report(report: RunReport, path: Path) -> list[str]:
    """The report's lines, and its own path, as a text file (atomic write); returns the lines written."""
    lines = [*report.lines(), f"{'report:':9}{path}"]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return lines
