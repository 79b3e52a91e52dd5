"""OneTrainer's rotation and colour jitter: exact pixel values, masks that follow the image, reproducible draws,
the TOML keys and flags, and latent caching that refuses (or sets prepared latents aside) where pixels change."""

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
from library.dataset.images import Jitter, jitter_colours, prepare_image
from library.dataset.latent_cache import refuse_incompatible
from library.dataset.loader import TrainDataset, attach_prepared_latents
from library.dataset.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import UserError

SIZE = 40  # square training crops, so a 90 degree turn maps pixels onto pixels
SQUARE = (slice(4, 12), slice(8, 20))  # rows, columns of the coloured square (off centre, not symmetric)
COLOUR = (255, 90, 30)


def square_image(path: Path, mode: str = "RGB") -> Path:
    """A black image with one coloured square; RGBA: alpha is the square; L: the square in white."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = np.zeros((SIZE, SIZE, channels), np.uint8)
    data[SQUARE] = {"RGB": COLOUR, "RGBA": (*COLOUR, 255), "L": (255,)}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data[..., 0] if mode == "L" else data, mode).save(path)
    return path


def prepare(tmp_path: Path, source: str, jitter: Jitter, seed: int = 3, **options):
    """The image's prepared crop with its mask from ``source``: masklabel file, alpha channel or conditioning."""
    image = square_image(tmp_path / "img.png", "RGBA" if source == "alpha" else "RGB")
    kwargs = {
        "masklabel": {"mask_path": square_image(tmp_path / "img-masklabel.png", "L")},
        "alpha": {"alpha_mask": True},
        "conditioning": {"conditioning_path": square_image(tmp_path / "cond" / "img.png", "RGB")},
    }[source]
    return prepare_image(image, (SIZE, SIZE), (SIZE, SIZE), random.Random(seed), jitter=jitter, **kwargs, **options)


def red_channel(prepared) -> np.ndarray:
    """The image's red channel back in 0..255 (the tensor holds value / 127.5 - 1)."""
    return np.rint((prepared.image[0].numpy() + 1.0) * 127.5)


@pytest.mark.parametrize("source", ["masklabel", "alpha", "conditioning"])
def test_rotation_moves_mask_and_image_together_pixel_for_pixel(tmp_path, source):
    """The mask is the square's own shape, so after any rotation (bilinear for both) it equals the image's red
    channel exactly, edge blending included; a 90 degree turn is exactly numpy's rot90 of the unrotated crop."""
    for jitter in (Jitter(rotate_max_angle=35.0), Jitter(rotate_fixed_angle=-17.5)):
        prepared = prepare(tmp_path, source, jitter, flip=True)
        mask = prepared.mask[0].numpy() * 255.0
        assert np.abs(mask - red_channel(prepared)).max() < 1e-3
        assert 2 < len(np.unique(np.rint(mask))) < 255  # rotated off the grid: blended edges, not a square
    plain = np.zeros((SIZE, SIZE))
    plain[SQUARE] = 1.0
    turned = prepare(tmp_path, source, Jitter(rotate_fixed_angle=90.0))
    assert np.array_equal(turned.mask[0].numpy(), np.rot90(plain))
    assert np.array_equal(red_channel(turned), np.rot90(plain) * 255)
    assert np.array_equal(np.rint((turned.image[1].numpy() + 1) * 127.5), np.rot90(plain) * COLOUR[1])


def test_rotation_angle_is_one_draw_from_the_sample_rng_after_the_crop(tmp_path):
    """Random: uniform(-a, a) from the sample's generator; the same seed gives the same crop (resume), and
    without jitter the generator is not touched (runs without it draw as before)."""
    jitter = Jitter(rotate_max_angle=30.0)
    assert jitter.angle(random.Random(5)) == random.Random(5).uniform(-30.0, 30.0)
    assert Jitter(rotate_fixed_angle=12.0).angle(random.Random(5)) == 12.0
    a, b = (prepare(tmp_path, "masklabel", jitter, seed=9) for _ in range(2))
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.image, prepare(tmp_path, "masklabel", jitter, seed=10).image)
    assert torch.equal(prepare(tmp_path, "masklabel", Jitter()).image, prepare(tmp_path, "masklabel", None).image)


def test_colour_jitter_uses_onetrainers_formulas():
    pixels = np.array([[[100, 200, 50], [255, 0, 0]]], np.uint8)
    assert jitter_colours(pixels, (1.5, 1.0, 1.0, 0.0)).tolist() == [[[150, 255, 75], [255, 0, 0]]]
    grey = pixels.astype(float) @ np.array([0.2989, 0.587, 0.114]) / 255.0  # torchvision's grey levels
    contrast = np.rint(np.clip(0.5 * pixels / 255.0 + 0.5 * grey.mean(), 0, 1) * 255)
    assert np.array_equal(jitter_colours(pixels, (1.0, 0.5, 1.0, 0.0)), contrast)
    desaturated = jitter_colours(pixels, (1.0, 1.0, 0.0, 0.0))
    assert np.array_equal(desaturated, np.repeat(np.rint(grey * 255)[..., None], 3, axis=-1))
    assert jitter_colours(pixels, (1.0, 1.0, 1.0, 1 / 3))[0, 1].tolist() == [0, 255, 0]  # red a third round: green
    assert jitter_colours(pixels, (1.0, 1.0, 1.0, 0.0)) is pixels


def test_colour_factors_draw_in_order_within_the_strengths():
    jitter = Jitter(brightness=0.2, contrast_fixed=0.5, saturation=3.0, hue=0.4)
    rng = random.Random(1)
    b, s, h = rng.uniform(0.8, 1.2), max(0.0, rng.uniform(-2.0, 4.0)), rng.uniform(-0.2, 0.2)
    assert jitter.colour_factors(random.Random(1)) == (b, 1.5, s, h)
    assert Jitter(hue_fixed=-0.5).colour_factors(random.Random(1)) == (1.0, 1.0, 1.0, -0.25)
    for seed in range(50):
        got = jitter.colour_factors(random.Random(seed))
        assert 0.8 <= got[0] <= 1.2 and got[2] >= 0.0 and -0.2 <= got[3] <= 0.2


def write_toml(tmp_path: Path, general: str = "", subset: str = "") -> Path:
    square_image(tmp_path / "imgs" / "a.png")
    path = tmp_path / "data.toml"
    path.write_text(
        f"[general]\n{general}\n[[datasets]]\nresolution = {SIZE}\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n{subset}\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs2'}'\n"
    )
    (tmp_path / "imgs2").mkdir(exist_ok=True)
    return path


def parse(*argv: str) -> DatasetFlags:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return dataset_flags(parser.parse_args(list(argv)))


def test_keys_ascend_from_general_and_flags_are_the_default(tmp_path):
    toml = write_toml(tmp_path, general="hue_aug = 0.2\nbrightness_aug = 0.1", subset="rotate_aug_max_angle = 15")
    flags = parse("--dataset_config", str(toml), "--rotate_aug_max_angle", "5", "--contrast_aug_fixed", "-0.5")
    first, second = load_dataset_configs(flags, {"dreambooth"})[0].subsets
    assert (first.rotate_aug_max_angle, first.hue_aug, first.brightness_aug, first.contrast_aug_fixed) == (
        15.0, 0.2, 0.1, -0.5)  # fmt: skip
    assert (second.rotate_aug_max_angle, second.hue_aug, second.saturation_aug) == (5.0, 0.2, 0.0)
    assert Jitter.of(first) == Jitter(15.0, 0.0, 0.1, 0.0, 0.0, -0.5, 0.0, 0.0, 0.2, 0.0)


@pytest.mark.parametrize(
    "subset, message",
    [
        ("rotate_aug_max_angle = 200", "key 'rotate_aug_max_angle' must be a number from 0 to 180, got 200"),
        ("hue_aug = -0.1", "key 'hue_aug' must be a number from 0 to 1, got -0.1"),
        ("brightness_aug = true", "key 'brightness_aug' must be a number, got true"),
        (
            "rotate_aug_max_angle = 10\nrotate_aug_fixed_angle = 5",
            "datasets[0].subsets[0]: rotate_aug_max_angle (10, random) and rotate_aug_fixed_angle (5, always) are "
            "both set; keep one of them (set the other to 0)",
        ),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, subset, message):
    toml = write_toml(tmp_path, subset=subset)
    with pytest.raises(UserError) as info:
        load_dataset_configs(DatasetFlags(dataset_config=str(toml)), {"dreambooth"})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_flag_out_of_range_is_refused():
    with pytest.raises(SystemExit):
        parse("--saturation_aug_fixed", "-2")


def test_latent_caching_refuses_pixel_augmentations_naming_subset_and_key():
    dataset = DatasetConfig("datasets[0]", "dreambooth", (SubsetConfig("datasets[0].subsets[0]", saturation_aug=0.3),))
    with pytest.raises(UserError) as info:
        refuse_incompatible([dataset], "--cache_latents_to_disk")
    assert str(info.value).startswith(
        "datasets[0].subsets[0]: saturation_aug cannot be combined with --cache_latents_to_disk"
    )
    refuse_incompatible([DatasetConfig("d", "dreambooth", (SubsetConfig("s"),))])  # nothing on: accepted


def test_prepared_latents_are_set_aside_for_jittered_subsets(tmp_path, caplog):
    """The subset trains from its image (the npz is not even opened), with a warning naming the key."""
    image = square_image(tmp_path / "a.png")
    subset = SubsetConfig("datasets[0].subsets[0]", tmp_path, rotate_aug_fixed_angle=10.0)
    dataset = DatasetConfig("datasets[0]", "finetune", (subset,), resolution=(SIZE, SIZE))
    record = ImageRecord(image, (SIZE, SIZE), ("a",), 0, latents_npz=tmp_path / "a.npz")
    with caplog.at_level(logging.WARNING, logger="sdtrain.dataset"):
        train = attach_prepared_latents(TrainDataset([dataset], [[record]], seed=1), None)
    assert train.latents is None and train.records == [[record]]
    assert "prepared latents not used: rotate_aug_fixed_angle (rotation/colour jitter) needs the image" in caplog.text
    batch = train.load_batch(train.batch_plan(1)[0])
    plain = np.zeros((SIZE, SIZE))
    plain[SQUARE] = 255.0
    assert not np.array_equal(np.rint((batch["images"][0, 0].numpy() + 1) * 127.5), plain)  # rotated
