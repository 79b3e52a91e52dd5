"""The dataset summary recipes and the loop read: start-of-run lines, ``ss_datasets`` entries, image counts, skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.config.dataset_config import DatasetFlags
from library.dataset.loader import build_train_dataset
from library.dataset.summary import DatasetSummary, summarize_dataset
from library.metadata import DatasetMetadata, SubsetMetadata
from tests.images import write_image

BUCKETS = dict(resolution="64", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    train, reg = tmp_path / "train" / "2_sks dog", tmp_path / "reg" / "1_dog"
    write_image(train / "a0.png", (64, 64), seed=0)
    (train / "a0.caption").write_text("sks, red")
    write_image(train / "a1.png", (120, 40), seed=1)  # aspect 3: bucket 96x32, no error
    (train / "a1.caption").write_text("sks, Blue, red")
    write_image(train / "a2.png", (60, 50), seed=2)  # aspect 1.2: bucket 64x64, error 0.2; class tokens as caption
    broken = train / "broken.png"
    broken.write_bytes(b"not an image")
    write_image(reg / "r0.png", (64, 64), seed=3)
    return train, broken


def test_summary_of_a_dreambooth_folder(tmp_path):
    train, broken = _folders(tmp_path)
    flags = DatasetFlags(
        train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), train_batch_size=2, **BUCKETS
    )
    dataset = build_train_dataset(flags, {"dreambooth"}, seed=4)
    summary = summarize_dataset(dataset)
    assert summary.lines == (
        "images: 3 train, 1 regularization, in 1 dataset(s)",
        "datasets[0]: batch size 2, resolution 64x64, buckets on",
        "  --train_data_dir 2_sks dog: 3 images x 2 repeats (train)",
        "  --reg_data_dir 1_dog: 1 images x 1 repeats (reg)",
        "  bucket      images  samples/epoch",
        "    64x64          3             10",
        "    96x32          1              2",
        "batches per epoch: 6 (epoch 1)",
        "skipped images: 1",
    )
    # 3 train images x 2 repeats; the one reg image x 1 (the plan repeats it to balance, ss_* counts it once)
    assert (summary.num_train_images, summary.num_reg_images) == (6, 1)
    assert summary.skipped == (str(broken),)
    assert summary.skipped_text == f"1 image(s) were skipped because they could not be read:\n  {broken}"
    (meta,) = summary.datasets
    subset = dict(img_count=3, num_repeats=2, image_dir="2_sks dog", class_tokens="sks dog")
    assert meta.subsets == [
        SubsetMetadata(**subset),
        SubsetMetadata(img_count=1, num_repeats=1, image_dir="1_dog", class_tokens="dog", is_reg=True),
    ]
    bucket_info = meta.bucket_info
    assert bucket_info is not None and bucket_info.pop("mean_img_ar_error") == pytest.approx(0.2 / 4)
    assert meta == DatasetMetadata(
        is_dreambooth=True,
        batch_size=2,
        num_train_images=6,
        num_reg_images=1,
        resolution=(64, 64),
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        tag_frequency={"2_sks dog": {"sks": 2, "red": 2, "blue": 1, "sks dog": 1}, "1_dog": {"dog": 1}},
        bucket_info={"buckets": {0: {"resolution": [64, 64], "count": 10}, 1: {"resolution": [96, 32], "count": 2}}},
        subsets=meta.subsets,
    )


def test_summary_of_a_fine_tuning_dataset_counts_metadata_tags(tmp_path):
    images = tmp_path / "images"
    for n in range(2):
        write_image(images / f"{n}.png", (64, 64), seed=n)
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({"0": {"caption": "a frog", "tags": "green, Pond"}, "1": {"tags": "pond"}}))
    flags = DatasetFlags(in_json=str(metadata), train_data_dir=str(images), resolution="64", dataset_repeats=3)
    summary = summarize_dataset(build_train_dataset(flags, {"finetune"}, seed=1))
    assert summary.lines == (
        "images: 2 train, 0 regularization, in 1 dataset(s)",
        "datasets[0]: batch size 1, resolution 64x64, buckets off",
        "  --in_json: 2 images x 3 repeats (train)",
        "  bucket      images  samples/epoch",
        "    64x64          2              6",
        "batches per epoch: 6 (epoch 1)",
    )
    assert (summary.num_train_images, summary.num_reg_images, summary.skipped, summary.skipped_text) == (6, 0, (), "")
    (meta,) = summary.datasets
    assert (meta.is_dreambooth, meta.bucket_info, meta.tag_frequency) == (
        False,
        None,
        {"meta.json": {"green": 1, "pond": 2}},
    )
    assert meta.subsets == [SubsetMetadata(img_count=2, num_repeats=3, image_dir="images", metadata_file="meta.json")]


def test_with_lines_and_skipped_text():
    summary = DatasetSummary(("images: 1",), (), 1, 0, ("a.png", "b.png"))
    assert summary.with_lines("captions: 2 templates").text == "images: 1\ncaptions: 2 templates"
    assert summary.lines == ("images: 1",)
    assert summary.skipped_text == "2 image(s) were skipped because they could not be read:\n  a.png\n  b.png"
