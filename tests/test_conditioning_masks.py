"""``conditioning_data_dir``: sd-scripts' --masked_loss masks from a folder of images paired by file name, read from
real image files and kept aligned with the image through resize, crop and flip (in memory and in the latent cache)."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.dataset_config import DatasetFlags, dataset_flags, load_dataset_configs
from library.config.flags import add_dataset_arguments
from library.dataset.images import prepare_image
from library.dataset.loader import attach_latent_cache, build_train_dataset
from library.dataset.scan import scan_subset
from library.dataset.types import SubsetConfig
from library.errors import UserError
from library.models.tiny import make_tiny_model

RED_COLUMNS = [0, 51, 102, 153, 204, 255, 0, 255]  # red value of each column of the 8x4 conditioning image
WIDE_RED = [(x * 37) % 256 for x in range(32)]  # red value of each column of a 32x16 conditioning image


def write_rgb(path: Path, red_columns: list[int], height: int = 4, green: int = 7) -> Path:
    """An RGB image whose red channel is ``red_columns[x]`` in every row (green/blue constant)."""
    data = np.zeros((height, len(red_columns), 3), dtype=np.uint8)
    data[..., 0] = np.array(red_columns, dtype=np.uint8)[None, :]
    data[..., 1] = green
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data, "RGB").save(path)
    return path


def parse(*argv: str) -> DatasetFlags:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    parser.add_argument("--masked_loss", action="store_true")
    return dataset_flags(parser.parse_args(list(argv)))


def dataset_toml(tmp_path: Path, extra: str = "") -> Path:
    write_rgb(tmp_path / "img" / "a.png", [10] * 32, height=16)
    write_rgb(tmp_path / "cond" / "a.bmp", WIDE_RED, height=16, green=200)
    path = tmp_path / "data.toml"
    path.write_text(
        "[general]\nresolution = [16, 16]\n[[datasets]]\n[[datasets.subsets]]\n"
        f"image_dir = '{tmp_path / 'img'}'\nconditioning_data_dir = '{tmp_path / 'cond'}'\n{extra}"
    )
    return path


def test_prepare_image_mask_is_red_channel_cropped_and_flipped(tmp_path):
    image = write_rgb(tmp_path / "a.png", [10] * 8)
    cond = write_rgb(tmp_path / "c.png", RED_COLUMNS, green=200)
    for flip in (False, True):
        prepared = prepare_image(image, (4, 4), (8, 4), random.Random(0), flip=flip, conditioning_path=cond)
        expected = [v / 255 for v in RED_COLUMNS[2:6]]  # centre crop: columns 2..5 of 8
        expected = expected[::-1] if flip else expected
        assert prepared.mask.shape == (1, 4, 4)
        assert torch.allclose(prepared.mask[0], torch.tensor([expected] * 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_mask_follows_random_crop_resize_and_flip(tmp_path, seed):
    # The conditioning image equals the training image, so its mask must equal the image's red channel in [0, 1]
    # pixel for pixel, whatever crop, flip and resize were drawn.
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    Image.fromarray(data, "RGB").save(tmp_path / "a.png")
    Image.fromarray(data, "RGB").save(tmp_path / "c.png")
    prepared = prepare_image(
        tmp_path / "a.png",
        (16, 16),
        (27, 16),
        random.Random(seed),
        flip=seed % 2 == 1,
        random_crop=True,
        conditioning_path=tmp_path / "c.png",
    )
    assert torch.allclose(prepared.mask[0], (prepared.image[0] + 1) / 2, atol=1e-6, rtol=0)


def test_config_accepts_the_subset_key_and_the_flag(tmp_path):
    path = dataset_toml(tmp_path)
    subset = load_dataset_configs(parse("--dataset_config", str(path)), {"dreambooth"})[0].subsets[0]
    assert subset.conditioning_data_dir == tmp_path / "cond"
    train = tmp_path / "train"
    write_rgb(train / "2_frog" / "a.png", [10] * 8)
    args = parse("--train_data_dir", str(train), "--conditioning_data_dir", str(tmp_path / "cond"))
    assert load_dataset_configs(args, {"dreambooth"})[0].subsets[0].conditioning_data_dir == tmp_path / "cond"


def test_config_errors(tmp_path):
    path = dataset_toml(tmp_path)
    path.write_text(path.read_text().replace(str(tmp_path / "cond"), str(tmp_path / "nope")))
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--dataset_config", str(path)), {"dreambooth"})
    assert str(info.value) == (
        f"{path}: datasets[0].subsets[0]: conditioning_data_dir '{tmp_path / 'nope'}' does not exist or is not a "
        "folder (relative paths are taken from the current directory)"
    )
    (tmp_path / "m.json").write_text("{}")
    path.write_text(
        f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{tmp_path / 'm.json'}'\n"
        f"conditioning_data_dir = '{tmp_path / 'cond'}'\n"
    )
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--dataset_config", str(path)), {"finetune"})
    assert str(info.value) == (
        f"{path}: datasets[0].subsets[0]: key 'conditioning_data_dir' is only for DreamBooth-style subsets "
        "(image_dir without metadata_file)"
    )


def test_scan_pairs_by_stem_and_reports_missing_and_extra(tmp_path, caplog):
    write_rgb(tmp_path / "img" / "a.png", [10] * 8)
    write_rgb(tmp_path / "img" / "b.png", [10] * 8)
    write_rgb(tmp_path / "cond" / "a.bmp", RED_COLUMNS)
    subset = SubsetConfig(name="s", image_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond")
    with pytest.raises(UserError) as info:
        scan_subset(subset, 0)
    assert str(info.value) == (
        f"s: 1 image(s) have no conditioning image of the same name in conditioning_data_dir '{tmp_path / 'cond'}' "
        "(b.png); add them or remove conditioning_data_dir"
    )
    write_rgb(tmp_path / "cond" / "b.PNG", RED_COLUMNS)
    write_rgb(tmp_path / "cond" / "zzz.png", RED_COLUMNS)
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        records = scan_subset(subset, 0).records
    assert [r.conditioning_path for r in records] == [tmp_path / "cond" / "a.bmp", tmp_path / "cond" / "b.PNG"]
    assert caplog.messages == [
        f"s: 1 conditioning image(s) in '{tmp_path / 'cond'}' match no training image and are not used (e.g. zzz)"
    ]


def test_masked_loss_batches_and_latent_cache_carry_the_mask(tmp_path, caplog):
    path = dataset_toml(tmp_path, "flip_aug = true\n")
    expected = torch.tensor([[v / 255 for v in WIDE_RED[8:24]]] * 16)  # 32x16 image -> centre crop to 16x16
    train = build_train_dataset(parse("--dataset_config", str(path), "--masked_loss"), {"dreambooth"}, seed=1)
    cached = attach_latent_cache(train, make_tiny_model(seed=0).vae, to_disk=True, progress=False)
    flips = set()
    for dataset in (train, cached):
        for plan in dataset.batch_plan(1) + dataset.batch_plan(2) + dataset.batch_plan(3):
            batch = dataset.load_batch(plan)
            mask = batch["alpha_masks"][0, 0]
            flips.add(batch["flipped"][0])
            assert torch.allclose(mask, expected.flip(-1) if batch["flipped"][0] else expected, atol=1e-6, rtol=0)
    assert flips == {False, True}
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        plain = build_train_dataset(parse("--dataset_config", str(path)), {"dreambooth"}, seed=1)
    assert plain.load_batch(plain.batch_plan(1)[0])["alpha_masks"] is None
    assert any("conditioning_data_dir is set but --masked_loss is not" in m for m in caplog.messages)
