"""tools/make_masks.py: CLIPSeg and alpha-channel masks written as ``<stem>-masklabel.png``, checked pixel by pixel
against an independent numpy computation on the tiny CLIPSeg model's own logits, the four modes on known masks,
resuming, and the training loader reading the written mask with --masked_loss."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.cli import run_cli
from library.config.dataset_config import dataset_flags
from library.config.flags import add_dataset_arguments
from library.dataset.loader import build_train_dataset
from library.prep.masks import MaskSettings, expand, make_masks, smooth
from tests.images import write_image
from tests.tiny_clipseg import make_tiny_clipseg
from tools.make_masks import main


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory) -> Path:
    return make_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "model")


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def white(path: Path) -> int:
    return int((read(path) == 255).sum())


def bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (edges clamped), written out by hand."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ly = axis(height, a.shape[0])
    x0, x1, lx = axis(width, a.shape[1])
    top = a[y0][:, x0] * (1 - lx) + a[y0][:, x1] * lx
    bottom = a[y1][:, x0] * (1 - lx) + a[y1][:, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


def box_blur(a: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(a, r, mode="edge")
    h, w = a.shape
    side = 2 * r + 1
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(side) for dx in range(side)) / side**2


def dilate(a: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(a, r, mode="edge")
    h, w = a.shape
    out = np.zeros_like(a)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def reference_mask(model_dir: Path, image_path: Path, prompts: list[str], threshold: float, sm: int, ex: int):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
    processor = CLIPSegProcessor.from_pretrained(model_dir)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        logits = model(**processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt"))
    probability = (1 / (1 + np.exp(-logits.logits.numpy().astype(np.float64)))).max(axis=0)
    grid = bilinear(box_blur(probability, sm), image.height, image.width)
    return np.where(dilate(grid > threshold, ex), 255, 0).astype(np.uint8)


def test_clipseg_masks_equal_an_independent_computation(clipseg, tmp_path):
    data = tmp_path / "data"
    write_image(data / "a.png", size=(48, 40), seed=1)
    write_image(data / "sub" / "b.jpg", size=(64, 64), seed=2)
    (data / "sub" / "broken.png").write_bytes(b"not an image")
    argv = [str(data), "--model", str(clipseg), "--prompt", "a cat", "--prompt", "dog, tree", "--device", "cpu"]
    argv += ["--threshold", "0.5", "--smooth_pixels", "1", "--expand_pixels", "2", "--batch_size", "2"]
    assert run_cli(main, [*argv, "--recursive"]) == 0
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*-masklabel.png")) == [
        "a-masklabel.png",
        "sub/b-masklabel.png",
    ]
    for image in (data / "a.png", data / "sub" / "b.jpg"):
        mask = read(image.with_name(image.stem + "-masklabel.png"))
        expected = reference_mask(clipseg, image, ["a cat", "dog", "tree"], 0.5, 1, 2)
        assert mask.shape == expected.shape == Image.open(image).size[::-1]
        assert 0 < (expected == 255).sum() < expected.size  # the check means something: some pixels each way
        assert np.array_equal(mask, expected)


def test_thresholds_zero_and_one_give_all_white_and_all_black(clipseg, tmp_path):
    write_image(tmp_path / "a.png", size=(40, 24), seed=3)
    base = [str(tmp_path), "--model", str(clipseg), "--prompt", "x", "--expand_pixels", "0", "--device", "cpu"]
    main([*base, "--threshold", "0"])
    assert white(tmp_path / "a-masklabel.png") == 40 * 24
    main([*base, "--threshold", "1", "--mode", "replace", "--overwrite"])
    assert white(tmp_path / "a-masklabel.png") == 0
    assert read(tmp_path / "a-masklabel.png").shape == (24, 40)


def test_smooth_and_expand_on_a_known_mask():
    dot = torch.zeros(1, 1, 12, 12)
    dot[0, 0, 5, 5] = 1
    assert int(expand(dot, 2).sum()) == 25
    corner = torch.zeros(1, 1, 12, 12)
    corner[0, 0, 0, 0] = 1
    assert int(expand(corner, 2).sum()) == 9  # only rows/columns 0..2 exist
    blurred = smooth(dot, 1)[0, 0]
    assert torch.allclose(blurred[4:7, 4:7], torch.full((3, 3), 1 / 9)) and int((blurred > 0).sum()) == 9
    assert smooth(corner, 1)[0, 0, 0, 0].item() == pytest.approx(4 / 9)  # the edge repeats the corner 3 more times


def write_rgba(path: Path, size: tuple[int, int], transparent: tuple[int, int, int, int]) -> Path:
    """An RGBA image, opaque except the box (left, top, right, bottom)."""
    data = np.full((size[1], size[0], 4), 200, dtype=np.uint8)
    data[..., 3] = 255
    left, top, right, bottom = transparent
    data[top:bottom, left:right, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data, "RGBA").save(path)
    return path


def test_alpha_mode_masks_exactly_the_transparent_pixels(tmp_path):
    write_rgba(tmp_path / "a.png", (30, 20), (4, 2, 14, 8))
    write_image(tmp_path / "rgb.jpg", size=(16, 8))
    main([str(tmp_path), "--alpha"])
    mask = read(tmp_path / "a-masklabel.png")
    assert mask.shape == (20, 30) and int((mask == 0).sum()) == 60 and int((mask == 255).sum()) == 600 - 60
    assert np.all(mask[2:8, 4:14] == 0)
    assert white(tmp_path / "rgb-masklabel.png") == 16 * 8  # no alpha channel: the whole image is trained


def test_modes_on_known_masks(tmp_path):
    # new mask (alpha): the top 5 rows are transparent, so the bottom half (100 px) is white
    image = write_rgba(tmp_path / "a.png", (20, 10), (0, 0, 20, 5))
    existing = np.zeros((10, 20), dtype=np.uint8)
    existing[:, :10] = 255  # left half white
    mask = tmp_path / "a-masklabel.png"

    def run(*flags: str) -> int:
        main([str(tmp_path), "--alpha", *flags])
        return white(mask)

    Image.fromarray(existing, "L").save(mask)
    assert run("--mode", "fill") == 100 and np.array_equal(read(mask), existing)  # kept
    assert run("--mode", "replace") == 100 and np.array_equal(read(mask), existing)  # kept without --overwrite
    assert run("--mode", "add") == 150  # left half + bottom-right quadrant
    assert run("--mode", "add") == 150  # running again changes nothing
    Image.fromarray(existing, "L").save(mask)
    assert run("--mode", "subtract") == 50  # left half minus bottom half: top-left quadrant
    assert np.all(read(mask)[:5, :10] == 255)
    assert run("--mode", "replace", "--overwrite") == 100 and np.all(read(mask)[5:] == 255)
    mask.unlink()
    assert run("--mode", "subtract") == 100 and np.all(read(mask)[:5] == 255)  # no mask = all white, minus new
    mask.unlink()
    assert run("--mode", "add") == 100
    assert image.exists()


def test_existing_mask_of_another_size_is_resized_before_combining(tmp_path):
    write_rgba(tmp_path / "a.png", (20, 10), (0, 0, 20, 10))  # all transparent: new mask all black
    Image.fromarray(np.full((5, 10), 255, dtype=np.uint8), "L").save(tmp_path / "a-masklabel.png")
    main([str(tmp_path), "--alpha", "--mode", "add"])
    assert read(tmp_path / "a-masklabel.png").shape == (10, 20) and white(tmp_path / "a-masklabel.png") == 200


def test_resume_skips_finished_images_and_reports_the_corrupt_one(tmp_path):
    for i in range(3):
        write_rgba(tmp_path / f"img{i}.png", (8, 8), (0, 0, i + 1, 1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    first = make_masks(MaskSettings(str(tmp_path), alpha=True))
    assert (first.processed, first.skipped, first.written, len(first.failed)) == (3, 0, 3, 1)
    assert [int((read(tmp_path / f"img{i}-masklabel.png") == 0).sum()) for i in range(3)] == [1, 2, 3]
    (tmp_path / "img1-masklabel.png").unlink()  # as if interrupted before it
    before = (tmp_path / "img0-masklabel.png").stat().st_mtime_ns
    again = make_masks(MaskSettings(str(tmp_path), alpha=True))
    assert (again.processed, again.skipped, again.written, len(again.failed)) == (1, 2, 1, 1)
    assert (tmp_path / "img0-masklabel.png").stat().st_mtime_ns == before
    assert int((read(tmp_path / "img1-masklabel.png") == 0).sum()) == 2
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--prompt is required"),
        (["--alpha", "--prompt", "x"], "--alpha takes the mask from the alpha channel"),
        (["--prompt", "x", "--threshold", "1.5"], "--threshold 1.5: must be between 0 and 1"),
        (["--prompt", "x", "--expand_pixels", "-1"], "--expand_pixels -1: must be 0 or more"),
        (["--prompt", " , "], "--prompt is required"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert run_cli(main, [str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    write_image(tmp_path / "a.png", size=(8, 8))
    assert run_cli(main, [str(tmp_path), "--prompt", "x", "--model", str(tmp_path / "nope")]) == 2
    assert f"--model {tmp_path / 'nope'}: cannot load" in capsys.readouterr().err


def test_training_reads_the_written_mask_with_masked_loss(tmp_path):
    folder = tmp_path / "train" / "1_frog"
    write_rgba(folder / "a.png", (16, 16), (0, 0, 16, 4))  # top 4 rows transparent -> not trained
    (folder / "a.txt").write_text("a frog")
    main([str(folder), "--alpha"])
    shutil.copy(folder / "a-masklabel.png", tmp_path / "kept.png")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    parser.add_argument("--masked_loss", action="store_true")
    args = parser.parse_args(["--train_data_dir", str(tmp_path / "train"), "--resolution", "16", "--masked_loss"])
    train = build_train_dataset(dataset_flags(args), {"dreambooth"}, seed=0)
    batch = train.load_batch(train.batch_plan(1)[0])
    expected = torch.ones(16, 16)
    expected[:4] = 0
    assert torch.equal(batch["alpha_masks"][0, 0], expected)
