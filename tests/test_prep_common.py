"""library/prep/common.py on real files: finding images, batches that skip corrupt files, side files that are never
overwritten without --overwrite, resume counting, device choice and one-line model loading errors."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.prep.common import (
    PrepReport,
    add_common_arguments,
    find_images,
    load_batches,
    load_pretrained,
    pick_device,
    sidecar,
    todo,
    write_side_file,
)
from tests.images import write_image


def names(paths: list[Path], root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


@pytest.fixture
def folder(tmp_path) -> Path:
    for name in ["b.png", "A.JPG", "c.Jpeg", "d.webp", "e.bmp", "a-masklabel.png", "sub/x.png", "sub/deeper/y.jpg"]:
        write_image(tmp_path / name, size=(8, 8))
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "dir.png").mkdir()  # a folder with an image-like name
    return tmp_path


def test_find_images_sorted_flat(folder):
    assert names(find_images(folder), folder) == ["A.JPG", "b.png", "c.Jpeg", "d.webp", "e.bmp"]


def test_find_images_recursive_sorts_by_path_parts(folder):
    # pathlib orders by parts, as sd-scripts' sorted Path list: "sub/..." after the files directly in the folder
    assert names(find_images(folder, recursive=True), folder) == [
        "A.JPG",
        "b.png",
        "c.Jpeg",
        "d.webp",
        "e.bmp",
        "sub/deeper/y.jpg",
        "sub/x.png",
    ]


def test_find_images_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"--input_dir {tmp_path / 'nope'}: folder not found")):
        find_images(tmp_path / "nope", flag="--input_dir")


def test_sidecar_adds_a_missing_dot(tmp_path):
    assert sidecar(tmp_path / "x.png", "txt") == tmp_path / "x.txt"
    assert sidecar(tmp_path / "x.y.png", ".caption") == tmp_path / "x.y.caption"


def test_load_batches_skips_a_corrupt_image_and_counts_it(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", size=(8 + i, 8), seed=i) for i in range(5)]
    paths[1].write_bytes(paths[1].read_bytes()[:40])  # truncated PNG
    paths[3].write_bytes(b"")  # empty file
    report = PrepReport("test")
    batches = list(load_batches(paths, 2, report, workers=2))
    assert [[p.name for p, _ in batch] for batch in batches] == [["0.png"], ["2.png"], ["4.png"]]
    assert [image.size for batch in batches for _, image in batch] == [(8, 8), (10, 8), (12, 8)]
    assert all(image.mode == "RGB" for batch in batches for _, image in batch)
    assert report.failed == [str(paths[1]), str(paths[3])]
    assert "0 processed, 0 skipped (already done), 2 failed, 0 written" in report.summary()


def test_load_batches_all_corrupt_yields_nothing(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    report = PrepReport("test")
    assert list(load_batches([bad], 4, report)) == []
    assert report.failed == [str(bad)]


def test_batch_size_below_one_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^--batch_size 0: must be 1 or more$"):
        list(load_batches([write_image(tmp_path / "a.png")], 0, PrepReport("test")))


def test_write_side_file_never_overwrites_without_overwrite(tmp_path):
    path = tmp_path / "a.txt"
    report = PrepReport("test")
    assert write_side_file(path, "first", overwrite=False, report=report) is True
    assert write_side_file(path, "second", overwrite=False, report=report) is False
    assert path.read_text() == "first"
    assert write_side_file(path, "third", overwrite=True, report=report) is True
    assert path.read_text() == "third"
    assert (report.written, report.skipped) == (2, 1)
    assert os.listdir(tmp_path) == ["a.txt"]


def test_todo_resumes_where_a_run_stopped(folder):
    images = find_images(folder)
    sidecar(images[0], ".txt").write_text("done")
    sidecar(images[2], ".txt").write_text("done")
    report = PrepReport("test")
    remaining = todo(images, lambda p: sidecar(p, ".txt").exists(), overwrite=False, report=report)
    assert names(remaining, folder) == ["b.png", "d.webp", "e.bmp"]
    assert report.skipped == 2
    again = PrepReport("test")
    assert todo(images, lambda p: sidecar(p, ".txt").exists(), overwrite=True, report=again) == images
    assert again.skipped == 0


def test_summary_line():
    report = PrepReport("tagging", processed=0, skipped=3, written=0)
    report.fail(Path("x.png"), "broken")
    assert re.fullmatch(
        r"tagging: 0 processed, 3 skipped \(already done\), 1 failed, 0 written in \d+\.\d s", report.summary()
    )
    report.processed = 4
    assert re.search(r", \d+\.\d\d images/s$", report.summary())


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^--device bogus: not a device name; use cpu, cuda or cuda:N$"):
        pick_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^--device cuda:1: CUDA is not available on this machine; use"):
            pick_device("cuda:1")
    with pytest.raises(UserError, match=r"^--device mps: the preparation scripts run on cpu or cuda; use one of them$"):
        pick_device("mps")


def test_load_pretrained_missing_is_one_line(tmp_path):
    from transformers import AutoConfig

    with pytest.raises(UserError) as missing_id:
        load_pretrained(AutoConfig.from_pretrained, "no-such-owner/no-such-model", "--caption_weights")
    message = str(missing_id.value)
    assert message.startswith("--caption_weights no-such-owner/no-such-model: cannot load this model id (")
    assert message.endswith("pass a local folder with the model files, or download the id first while online")
    assert "\n" not in message
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(f"--model_dir {empty}: cannot load this folder (")):
        load_pretrained(AutoConfig.from_pretrained, str(empty), "--model_dir")


def test_load_pretrained_error_without_a_message():
    def loader(name: str, **kwargs) -> None:
        raise OSError()

    with pytest.raises(UserError, match=r"^--model x: cannot load this model id \(OSError\)"):
        load_pretrained(loader, "x", "--model")


def test_common_arguments_defaults():
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, batch_size=8)
    args = parser.parse_args([])
    assert vars(args) == {
        "recursive": False,
        "overwrite": False,
        "device": None,
        "batch_size": 8,
        "max_data_loader_n_workers": None,
        "debug": False,
    }


def test_load_pretrained_tries_the_local_copy_before_the_hub():
    calls: list[dict] = []

    def loader(name: str, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise OSError("not cached")
        return name.upper()

    assert load_pretrained(loader, "me/model", "--model", revision="x") == "ME/MODEL"
    assert calls == [{"local_files_only": True, "revision": "x"}, {"revision": "x"}]
    calls.clear()
    assert load_pretrained(lambda name, **kwargs: calls.append(kwargs) or name, "me/model", "--model") == "me/model"
    assert calls == [{"local_files_only": True}]
