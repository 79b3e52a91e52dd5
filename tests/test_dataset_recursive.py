"""``recursive = true`` in a dataset TOML subset: images in sub-folders with their captions and masks (DreamBooth
style), metadata keys found in sub-folders (fine-tuning style), off by default, and the schema's one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.cli import run_cli
from library.config.dataset_config import DatasetFlags, load_dataset_configs
from library.dataset.loader import build_train_dataset
from library.dataset.scan import scan_dataset
from library.errors import UserError
from tests.images import write_image
from tests.training import write_dataset_toml


def write_tree(root: Path) -> Path:
    """top.png + top.txt; a/mid.png + a/mid.txt + a/mid-masklabel.png; a/b/deep.png (no caption); .hidden/h.png."""
    folder = root / "img"
    write_image(folder / "top.png", seed=1)
    (folder / "top.txt").write_text("top caption")
    write_image(folder / "a" / "mid.png", size=(64, 32), seed=2)
    (folder / "a" / "mid.txt").write_text("mid caption")
    write_image(folder / "a" / "mid-masklabel.png", size=(64, 32), mode="L", seed=3)
    write_image(folder / "a" / "b" / "deep.png", seed=4)
    write_image(folder / ".hidden" / "h.png", seed=5)
    return folder


def records(config: Path, style: str = "dreambooth", **flags) -> list:
    datasets = load_dataset_configs(DatasetFlags(dataset_config=str(config), **flags), {style})
    return scan_dataset(datasets[0]).records


def test_dreambooth_subset_reads_sub_folders_with_captions_and_masks(tmp_path):
    folder = write_tree(tmp_path)
    subset = {"image_dir": folder.as_posix(), "caption_extension": ".txt", "class_tokens": "cls", "recursive": True}
    found = records(write_dataset_toml(tmp_path / "d.toml", [{"subsets": [subset]}]))
    got = [(r.path.relative_to(folder).as_posix(), r.size, r.captions, r.mask_path) for r in found]
    assert got == [
        ("a/b/deep.png", (64, 64), (), None),
        ("a/mid.png", (64, 32), ("mid caption",), folder / "a" / "mid-masklabel.png"),
        ("top.png", (64, 64), ("top caption",), None),
    ]


def test_recursive_is_off_by_default(tmp_path):
    folder = write_tree(tmp_path)
    subset = {"image_dir": folder.as_posix(), "caption_extension": ".txt"}
    found = records(write_dataset_toml(tmp_path / "d.toml", [{"subsets": [subset]}]))
    assert [r.path.name for r in found] == ["top.png"]


def test_finetune_subset_finds_keys_in_sub_folders(tmp_path):
    folder = write_tree(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"mid": {"caption": "m"}, "deep": {"caption": "d"}, "top": {"caption": "t"}}))
    subset = {"image_dir": folder.as_posix(), "metadata_file": meta.as_posix(), "recursive": True}
    found = records(write_dataset_toml(tmp_path / "f.toml", [{"subsets": [subset]}]), "finetune")
    assert [(r.path.relative_to(folder).as_posix(), r.captions) for r in found] == [
        ("a/mid.png", ("m",)),
        ("a/b/deep.png", ("d",)),
        ("top.png", ("t",)),
    ]
    assert found[0].mask_path == folder / "a" / "mid-masklabel.png"
    subset["recursive"] = False
    found = records(write_dataset_toml(tmp_path / "f.toml", [{"subsets": [subset]}]), "finetune")
    assert [r.path.name for r in found] == ["top.png"]


def test_recursive_dataset_trains_nested_images(tmp_path):
    folder = write_tree(tmp_path)
    subset = {"image_dir": folder.as_posix(), "caption_extension": ".txt", "recursive": True}
    config = write_dataset_toml(tmp_path / "d.toml", [{"resolution": 64, "batch_size": 3, "subsets": [subset]}])
    train = build_train_dataset(DatasetFlags(dataset_config=str(config)), {"dreambooth"}, seed=0)
    batch = train.load_batch(train.batch_plan(1)[0])
    assert sorted(Path(p).name for p in batch["paths"]) == ["deep.png", "mid.png", "top.png"]
    assert batch["images"].shape == (3, 3, 64, 64)


@pytest.mark.parametrize("value", ["yes", 1])
def test_non_boolean_recursive_is_one_line(tmp_path, value):
    folder = write_tree(tmp_path)
    config = write_dataset_toml(
        tmp_path / "d.toml", [{"subsets": [{"image_dir": folder.as_posix(), "recursive": value}]}]
    )
    with pytest.raises(UserError) as e:
        records(config)
    assert str(e.value) == (
        f"{config}: datasets[0].subsets[0]: key 'recursive' must be true or false, got {json.dumps(value)}"
    )


def test_recursive_outside_a_subset_is_refused(tmp_path, capsys):
    import train_db

    folder = write_tree(tmp_path)
    config = write_dataset_toml(
        tmp_path / "d.toml", [{"recursive": True, "subsets": [{"image_dir": folder.as_posix()}]}]
    )
    argv = ["--dataset_config", str(config), "--pretrained_model_name_or_path", "tiny-sd1"]
    assert run_cli(train_db.main, [*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"error: {config}: datasets[0]: key 'recursive' belongs in a [[datasets.subsets]] entry, not in a "
        + ("[[datasets]] entry")
    )
