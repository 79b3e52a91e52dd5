"""SDXL's size conditioning in training batches (sd-scripts' original_sizes_hw, crop_top_lefts, target_sizes_hw),
``--bucket_reso_steps 32`` end to end and SDXL's latent cache file names, on real image files."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from library.config.dataset_config import dataset_flags
from library.config.flags import add_dataset_arguments
from library.dataset.loader import TrainDataset, build_train_dataset
from library.models.tiny import make_tiny_model
from tests.images import write_image

BUCKET_FLAGS = ["--resolution", "256", "--enable_bucket", "--min_bucket_reso", "128", "--max_bucket_reso", "512"]


def _flags(data: Path, *extra: str):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return dataset_flags(parser.parse_args(["--train_data_dir", str(data), *BUCKET_FLAGS, *extra]))


def _batches(train: TrainDataset, epochs: int) -> list[dict]:
    return [train.load_batch(p) for e in range(1, epochs + 1) for p in train.batch_plan(e)]


def _wide_image(tmp_path: Path) -> Path:
    """A 301x200 image: with resolution 256 and step 32 it goes to the 320x192 bucket (scaled to 320x213)."""
    return write_image(tmp_path / "data" / "4_sks" / "a.png", (301, 200), seed=1)


def test_image_batches_carry_sd_scripts_size_conditioning(tmp_path):
    _wide_image(tmp_path)
    flags = _flags(tmp_path / "data", "--bucket_reso_steps", "32", "--flip_aug", "--random_crop")
    train = build_train_dataset(flags, {"dreambooth"}, seed=3, progress=False)
    seen, tops = set(), set()
    for batch in _batches(train, 4):
        assert batch["images"].shape == (1, 3, 192, 320)
        assert batch["original_sizes_hw"] == [(200, 301)]
        assert batch["target_sizes_hw"] == [(192, 320)]
        # sd-scripts: fitted width 288.96, left 15; flipped: int(320 - 303.96) = 16; the random crop's offset is
        # not reflected (sd-scripts' trim_and_resize_if_required)
        flipped = batch["flipped"][0]
        assert batch["crop_top_lefts"] == [(0, 16 if flipped else 15)]
        seen.add(flipped)
        tops.add(batch["images"][0, :, 0, :].sum().item())
    assert seen == {True, False}
    assert len(tops) > 2  # the random crop did move


def test_cached_latent_batches_carry_the_same_values_and_sdxl_file_names(tmp_path):
    image = _wide_image(tmp_path)
    flags = _flags(tmp_path / "data", "--bucket_reso_steps", "32", "--flip_aug", "--cache_latents_to_disk")
    vae = make_tiny_model().vae
    train = build_train_dataset(flags, {"dreambooth"}, vae, seed=3, progress=False, latents_npz_suffix="_sdxl.npz")
    assert sorted(p.name for p in image.parent.glob("*.npz")) == ["a_0301x0200_sdxl.npz"]
    with np.load(image.parent / "a_0301x0200_sdxl.npz") as z:
        assert z["latents"].shape == (4, 24, 40) and z["original_size"].tolist() == [301, 200]
    seen = set()
    for batch in _batches(train, 4):
        assert batch["latents"].shape == (1, 4, 24, 40)
        assert batch["original_sizes_hw"] == [(200, 301)] and batch["target_sizes_hw"] == [(192, 320)]
        assert batch["crop_top_lefts"] == [(0, 16 if batch["flipped"][0] else 15)]
        seen.add(batch["flipped"][0])
    assert seen == {True, False}
    again = build_train_dataset(flags, {"dreambooth"}, vae, seed=3, progress=False)  # SD 1.x/2.x: their own files
    assert sorted(p.name for p in image.parent.glob("*.npz")) == ["a_0301x0200_sd.npz", "a_0301x0200_sdxl.npz"]
    assert again.load_batch(again.batch_plan(1)[0])["latents"].shape == (1, 4, 24, 40)


def test_step_32_buckets_follow_the_table(tmp_path):
    sizes = {"tall.png": (200, 301), "square.png": (250, 250), "wide.png": (600, 200)}
    folder = tmp_path / "data" / "1_x"
    for name, size in sizes.items():
        write_image(folder / name, size, seed=len(name))
    train = build_train_dataset(_flags(tmp_path / "data", "--bucket_reso_steps", "32"), {"dreambooth"}, seed=1)
    buckets = {r.path.name: a.bucket for r, a in zip(train.records[0], train.assignments[0])}
    # 256x256 area, step 32: 192x320 (aspect 0.6), 256x256, and 416x128 for 3:1 (sd-scripts' table for these)
    assert buckets == {"tall.png": (192, 320), "square.png": (256, 256), "wide.png": (416, 128)}
    for plan in train.batch_plan(1):
        batch = train.load_batch(plan)
        name = Path(batch["paths"][0]).name
        w, h = buckets[name]
        assert batch["images"].shape == (1, 3, h, w) and batch["target_sizes_hw"] == [(h, w)]
        assert batch["original_sizes_hw"] == [(sizes[name][1], sizes[name][0])]
        with Image.open(folder / name) as im:
            assert im.size == sizes[name]
