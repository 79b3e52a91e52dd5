"""merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py on real folders: image keys as sd-scripts writes
them, existing entries kept, unreadable caption files skipped, atomic writes, and the training scan reading the
result."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from library.cli import run_cli
from library.dataset.scan import scan_subset
from library.dataset.types import SubsetConfig
from tests.images import write_image

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path) -> Path:
    """img/: a.png (caption + tags), b.jpg (caption, bad-UTF-8 tags), c.webp (no side files), broken.png (garbage,
    with a caption), a mask, a text file, and sub/d.png (caption + tags)."""
    img = root / "img"
    write_image(img / "a.png", seed=1)
    write_image(img / "b.jpg", seed=2)
    write_image(img / "c.webp", seed=3)
    write_image(img / "a-masklabel.png", mode="L")
    write_image(img / "sub" / "d.png", seed=4)
    (img / "broken.png").write_bytes(b"not an image")
    (img / "notes.md").write_text("not an image")
    (img / "a.caption").write_text("  a photo of a woman\n", encoding="utf-8")
    (img / "b.caption").write_text("\ufeffa red car", encoding="utf-8")  # a BOM is not part of the caption
    (img / "broken.caption").write_text("garbage", encoding="utf-8")
    (img / "sub" / "d.caption").write_text("a dog", encoding="utf-8")
    (img / "a.txt").write_text("1girl, long_hair, rating:safe\n", encoding="utf-8")
    (img / "b.txt").write_bytes(b"car, \xff\xfe")
    (img / "sub" / "d.txt").write_text("dog", encoding="utf-8")
    return img


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_captions_keyed_by_stem(tmp_path, capsys):
    img = make_folder(tmp_path)
    out = tmp_path / "meta.json"
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out)]) == 0
    # broken.png is an image file name with a caption: its pixels are the training side's business
    assert read(out) == {
        "a": {"caption": "a photo of a woman"},
        "b": {"caption": "a red car"},
        "broken": {"caption": "garbage"},
    }
    err = capsys.readouterr().err
    assert (
        f"merge caption: 4 images, 3 .caption files found (1 missing, 0 unreadable), 3 entries added, 0 updated; "
        f"3 entries written to {out}" in err
    )
    assert f"1 images have no .caption file (left out): {img / 'c.webp'}" in err


def test_full_path_recursive_keys_are_the_paths_as_found(tmp_path, monkeypatch):
    make_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["img", "meta.json", "--full_path", "--recursive", "--caption_extention", ".caption"]
    assert run_cli(merge_captions_to_metadata.main, argv) == 0
    # sd-scripts keys are str(Path(train_data_dir) / name): relative when the folder was given relative
    assert read(tmp_path / "meta.json") == {
        "img/a.png": {"caption": "a photo of a woman"},
        "img/b.jpg": {"caption": "a red car"},
        "img/broken.png": {"caption": "garbage"},
        "img/sub/d.png": {"caption": "a dog"},
    }


def test_recursive_needs_full_path(tmp_path, capsys):
    img = make_folder(tmp_path)
    assert run_cli(merge_dd_tags_to_metadata.main, [str(img), str(tmp_path / "m.json"), "--recursive"]) == 2
    assert capsys.readouterr().err.startswith("error: --recursive needs --full_path: ")
    assert not (tmp_path / "m.json").exists()


def test_tags_merge_into_existing_entries_and_unreadable_files_are_skipped(tmp_path, capsys):
    img = make_folder(tmp_path)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"a": {"caption": "kept", "train_resolution": [64, 64]}, "z": {"caption": "other"}}))
    out = tmp_path / "new.json"
    assert run_cli(merge_dd_tags_to_metadata.main, [str(img), str(out), "--in_json", str(old), "--debug"]) == 0
    assert read(out) == {
        "a": {"caption": "kept", "train_resolution": [64, 64], "tags": "1girl, long_hair, rating:safe"},
        "z": {"caption": "other"},
    }
    err = capsys.readouterr().err
    assert f"{img / 'b.txt'}: tags file is not UTF-8 text (byte 5 is 0xff); re-save it as UTF-8" in err
    assert (
        f"merge tags: 4 images, 1 .txt files found (2 missing, 1 unreadable), 0 entries added, 1 updated; "
        f"2 entries written to {out}" in err
    )
    assert read(old) == {"a": {"caption": "kept", "train_resolution": [64, 64]}, "z": {"caption": "other"}}


def test_out_json_is_read_and_updated_when_no_in_json(tmp_path):
    img = make_folder(tmp_path)
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"a": {"caption": "old", "tags": "old tags"}, "gone": {"caption": "x"}}))
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out)]) == 0
    assert read(out) == {
        "a": {"caption": "a photo of a woman", "tags": "old tags"},
        "gone": {"caption": "x"},
        "b": {"caption": "a red car"},
        "broken": {"caption": "garbage"},
    }


def test_bad_in_json_is_one_line(tmp_path, capsys):
    img = make_folder(tmp_path)
    out = tmp_path / "out.json"
    missing = tmp_path / "missing.json"
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out), "--in_json", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: --in_json {missing}: metadata file not found; check the path\n"
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": {"caption": "x"},', encoding="utf-8")
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out), "--in_json", str(broken)]) == 2
    assert capsys.readouterr().err == (
        f"error: --in_json {broken}: JSON syntax error at line 1, column 24: Expecting property name enclosed in "
        "double quotes\n"
    )
    listed = tmp_path / "list.json"
    listed.write_text('{"a": ["x"]}', encoding="utf-8")
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out), "--in_json", str(listed)]) == 2
    assert capsys.readouterr().err == f"error: --in_json {listed}: entry 'a' must be a JSON object, got list\n"
    assert not out.exists()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE: the kernel refuses writes past ``limit`` bytes (EFBIG), a real write failure midway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_same_in_and_out_file_survives_a_failed_write(tmp_path, capsys):
    img = tmp_path / "img"
    write_image(img / "a.png")
    (img / "a.caption").write_text("x" * 5000, encoding="utf-8")
    meta = tmp_path / "meta.json"
    before = json.dumps({"a": {"caption": "old"}, "b": {"caption": "other"}})
    meta.write_text(before, encoding="utf-8")
    with file_size_limit(4096):
        code = run_cli(merge_captions_to_metadata.main, [str(img), str(meta), "--in_json", str(meta)])
    assert code == 2
    assert capsys.readouterr().err.endswith(
        f"error: {meta}: file too large for this file system while writing; the previous file is intact; "
        "write to another file system and rerun\n"
    )
    assert meta.read_text(encoding="utf-8") == before
    assert sorted(os.listdir(tmp_path)) == ["img", "meta.json"]


def test_training_scan_reads_the_merged_and_cleaned_metadata(tmp_path):
    img = make_folder(tmp_path)
    meta = tmp_path / "meta.json"
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(meta)]) == 0
    assert run_cli(merge_dd_tags_to_metadata.main, [str(img), str(meta)]) == 0
    assert run_cli(clean_captions_and_tags.main, [str(meta), str(meta)]) == 0
    result = scan_subset(SubsetConfig(name="s", image_dir=img, metadata_file=meta), 0)
    seen = {record.path.name: record.captions for record in result.records}
    assert seen == {"a.png": ("a photo of a girl,1girl, long hair",), "b.jpg": ("a red car",)}
    assert [path.name for path, _ in result.skipped] == ["broken.png"]


def test_training_scan_reads_full_path_keys_without_image_dir(tmp_path):
    img = make_folder(tmp_path)
    meta = tmp_path / "meta.json"
    assert run_cli(merge_dd_tags_to_metadata.main, [str(img), str(meta), "--full_path", "--recursive"]) == 0
    records = scan_subset(SubsetConfig(name="s", metadata_file=meta), 0).records
    assert {r.path: r.captions for r in records} == {
        img / "a.png": ("1girl, long_hair, rating:safe",),
        img / "sub" / "d.png": ("dog",),
    }


def test_script_runs_as_a_command(tmp_path):
    img = make_folder(tmp_path)
    out = tmp_path / "meta.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "merge_dd_tags_to_metadata.py"), str(img), str(out), "--full_path"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert read(out) == {str(img / "a.png"): {"tags": "1girl, long_hair, rating:safe"}}


def test_two_images_sharing_a_stem_are_one_entry_with_a_warning(tmp_path, capsys):
    img = tmp_path / "img"
    write_image(img / "a.jpg")
    write_image(img / "a.png")
    (img / "a.caption").write_text("shared", encoding="utf-8")
    out = tmp_path / "m.json"
    assert run_cli(merge_captions_to_metadata.main, [str(img), str(out)]) == 0
    assert read(out) == {"a": {"caption": "shared"}}
    assert f"{img / 'a.jpg'} and {img / 'a.png'} share the key 'a'; the later one wins (use --full_path)" in (
        capsys.readouterr().err
    )
