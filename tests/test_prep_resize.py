"""tools/resize_images_to_resolution.py: output sizes and names as sd-scripts computes them (hand-worked below),
centred crops and filters checked pixel by pixel, associated files and masks, a corrupt image, resuming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli import run_cli
from library.prep.resize import ResizeSettings, resize_folder
from tests.images import write_image
from tools.resize_images_to_resolution import main


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_sizes_names_and_associated_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "big.png", size=(1000, 800))
    write_image(src / "small.jpg", size=(100, 60))
    (src / "big.txt").write_text("a big frog")
    (src / "big.caption").write_text("caption")
    (src / "notes.json").write_text("{}")
    (src / "broken.webp").write_bytes(b"RIFF broken")
    Image.fromarray(np.full((800, 1000), 255, dtype=np.uint8), "L").save(src / "big-masklabel.png")
    argv = [str(src), str(dst), "--max_resolution", "512x512, 384x384", "--divisible_by", "8"]
    assert run_cli(main, [*argv, "--copy_associated_files"]) == 0
    # 1000x800 -> 512x512 (262144 px): scale sqrt(262144/800000) -> int 572x457 -> multiples of 8: 568x456
    # 1000x800 -> 384x384 (147456 px): scale sqrt(147456/800000) -> int 429x343 -> 424x336
    # 100x60 is below both: never enlarged, only cropped to 96x56
    assert size(dst / "big+512x512.jpg") == (568, 456) and 568 * 456 <= 512 * 512
    assert size(dst / "big+384x384.jpg") == (424, 336)
    assert size(dst / "small+512x512.jpg") == size(dst / "small+384x384.jpg") == (96, 56)
    assert size(dst / "big+512x512-masklabel.png") == (568, 456)
    assert Image.open(dst / "big+512x512.jpg").format == "JPEG"
    assert sorted(p.name for p in dst.iterdir()) == [
        "big+384x384-masklabel.png",
        "big+384x384.caption",
        "big+384x384.jpg",
        "big+384x384.txt",
        "big+512x512-masklabel.png",
        "big+512x512.caption",
        "big+512x512.jpg",
        "big+512x512.txt",
        "big.caption",  # sd-scripts copies every file that is not an image as it is
        "big.txt",
        "notes.json",
        "small+384x384.jpg",
        "small+512x512.jpg",
    ]
    assert (dst / "big+384x384.txt").read_text() == "a big frog"


def test_centred_crop_and_nearest_filter_pixel_for_pixel(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    src.mkdir()
    Image.fromarray(data, "RGB").save(src / "a.png")
    main([str(src), str(dst), "--max_resolution", "100x100", "--divisible_by", "4", "--save_as_png"])
    assert np.array_equal(np.asarray(Image.open(dst / "a+100x100.png")), data[1:9, :])  # 12x10 -> 12x8 from row 1
    main([str(src), str(dst), "--max_resolution", "6x5", "--interpolation", "nearest", "--save_as_png"])
    # 120 px -> 30: scale 0.5 -> 6x5; nearest takes the pixel under each output pixel's centre: odd rows/columns
    assert np.array_equal(np.asarray(Image.open(dst / "a+6x5.png")), data[1::2, 1::2])


def test_resume_keeps_existing_outputs_unless_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(3):
        write_image(src / f"img{i}.png", size=(64, 48), seed=i)
    (src / "img0.txt").write_text("old")
    (src / "broken.png").write_bytes(b"\x89PNG")
    settings = ResizeSettings(str(src), str(dst), max_resolution="32x32", copy_associated_files=True)
    first = resize_folder(settings)
    assert (first.processed, first.skipped, len(first.failed), first.written) == (3, 0, 1, 5)  # 3 images, 2 txt
    (dst / "img2+32x32.jpg").unlink()  # as if interrupted before it
    kept = (dst / "img0+32x32.jpg").stat().st_mtime_ns
    (src / "img0.txt").write_text("new")
    again = resize_folder(settings)
    assert (again.processed, again.skipped, len(again.failed), again.written) == (1, 2, 1, 1)
    assert (dst / "img0+32x32.jpg").stat().st_mtime_ns == kept
    assert (dst / "img0+32x32.txt").read_text() == "old"
    forced = resize_folder(ResizeSettings(str(src), str(dst), max_resolution="32x32", overwrite=True))
    assert (forced.processed, forced.written) == (3, 4) and (dst / "img0.txt").read_text() == "new"
    assert size(dst / "img1+32x32.jpg") == (36, 27)  # sqrt(1024/3072) * (64, 48) = (36.95, 27.7)
    assert not list(dst.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_resolution", "512"], "--max_resolution 512: '512' is not WIDTHxHEIGHT"),
        (["--divisible_by", "0"], "--divisible_by 0: must be 1 or more"),
        (["--interpolation", "bogus"], "argument --interpolation: invalid choice"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, extra, message):
    write_image(tmp_path / "src" / "a.png", size=(8, 8))
    assert run_cli(main, [str(tmp_path / "src"), str(tmp_path / "dst"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_same_folder_and_missing_folder_are_refused(tmp_path, capsys):
    write_image(tmp_path / "a.png", size=(8, 8))
    assert run_cli(main, [str(tmp_path), str(tmp_path)]) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert run_cli(main, [str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "src_img_folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_too_small_and_same_name_images_are_reported_and_skipped(tmp_path):
    write_image(tmp_path / "src" / "tiny.png", size=(3, 3))
    write_image(tmp_path / "src" / "ok.png", size=(16, 16))
    write_image(tmp_path / "src" / "ok.webp", size=(16, 16))  # would write ok+64x64.jpg too
    report = resize_folder(ResizeSettings(str(tmp_path / "src"), str(tmp_path / "dst"), "64x64", divisible_by=8))
    assert report.processed == 1 and sorted(Path(p).name for p in report.failed) == ["ok.webp", "tiny.png"]
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["ok+64x64.jpg"]
