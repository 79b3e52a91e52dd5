"""Image loading, geometry, augmentation and masks, on real files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset.images import (
    ImageLoadError,
    face_from_name,
    open_image,
    pick_resample,
    plan_face_crop,
    prepare_image,
)
from library.dataset.scan import read_size
from library.errors import UserError
from tests.images import write_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _half_red(path, size=(96, 64)):
    """Left half red, right half blue; mask beside it: left half white (train), right half black."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = RED
    pixels[:, w // 2 :] = BLUE
    Image.fromarray(pixels).save(path)
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 255
    mask_path = path.with_name(path.stem + "-masklabel.png")
    Image.fromarray(mask, "L").save(mask_path)
    return mask_path


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_mask_follows_random_crop_and_flip_pixel_for_pixel(tmp_path, flip, seed):
    path = tmp_path / "half.png"
    mask_path = _half_red(path)
    out = prepare_image(path, (64, 64), (96, 64), random.Random(seed), flip=flip, random_crop=True, mask_path=mask_path)
    assert out.image.shape == (3, 64, 64) and out.mask.shape == (1, 64, 64)
    red = out.image[0] > 0  # red channel +1 on the red half, -1 on the blue half
    assert torch.equal(out.mask[0] > 0.5, red)
    offset = random.Random(seed).randint(0, 32)  # the crop's left edge: the same draw prepare_image makes
    assert int(red.sum()) == (48 - offset) * 64
    assert bool(red[:, -1 if flip else 0].all()) and not bool(red[:, 0 if flip else -1].any())


def test_mask_goes_through_the_same_resize(tmp_path):
    rng = np.random.default_rng(0)
    pattern = np.kron(rng.integers(0, 256, (10, 12), dtype=np.uint8), np.ones((10, 10), np.uint8))  # 100x120 blocks
    pixels = np.zeros((100, 120, 3), np.uint8)
    pixels[..., 0] = pattern
    path = tmp_path / "pattern.png"
    Image.fromarray(pixels).save(path)
    mask_path = tmp_path / "pattern-masklabel.png"
    Image.fromarray(pattern, "L").save(mask_path)
    for interpolation in (None, "lanczos", "bilinear"):
        out = prepare_image(
            path,
            (64, 64),
            (77, 64),
            random.Random(3),
            flip=True,
            random_crop=True,
            mask_path=mask_path,
            interpolation=interpolation,
        )
        assert torch.allclose((out.image[0] + 1) / 2, out.mask[0], atol=1e-6)


def test_alpha_mask_extracted_and_colour_under_transparency_kept(tmp_path):
    h, w = 64, 64
    pixels = np.zeros((h, w, 4), np.uint8)
    pixels[..., 1] = 200  # green everywhere, even where fully transparent
    pixels[..., 3] = np.tile(np.arange(w, dtype=np.uint8) * 4, (h, 1))  # alpha 0, 4, 8, ... 252 across
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)
    out = prepare_image(path, (64, 64), (64, 64), random.Random(0), alpha_mask=True)
    expected = torch.from_numpy(pixels[..., 3].astype(np.float32) / 255.0)
    assert torch.equal(out.mask[0], expected)
    assert torch.allclose(out.image[1], torch.full((h, w), 200 / 127.5 - 1))
    no_alpha = prepare_image(path, (64, 64), (64, 64), random.Random(0))
    assert no_alpha.mask is None and no_alpha.image.shape == (3, 64, 64)


def test_alpha_and_mask_file_multiply(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[:4, :, 3] = 0  # top half transparent
    path = tmp_path / "both.png"
    Image.fromarray(pixels, "RGBA").save(path)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255  # left half train
    mask_path = tmp_path / "both-masklabel.png"
    Image.fromarray(mask, "L").save(mask_path)
    out = prepare_image(path, (8, 8), (8, 8), random.Random(0), alpha_mask=True, mask_path=mask_path)
    expected = torch.zeros(8, 8)
    expected[4:, :4] = 1
    assert torch.equal(out.mask[0], expected)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = RED  # left half red as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif.tobytes())
    assert read_size(path) == (20, 40)
    decoded = np.asarray(open_image(path))
    assert decoded.shape == (40, 20, 3)
    assert (decoded[:20, :, 0] == 255).all() and (decoded[20:, :, 0] == 0).all()  # red half is now on top


def test_corrupt_and_truncated_images_raise_image_load_error(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    good = write_image(tmp_path / "good.png", (64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(ImageLoadError) as info:
            prepare_image(path, (64, 64), (64, 64), random.Random(0))
        assert info.value.path == path and str(path) in str(info.value)


def test_pixels_map_to_minus_one_one(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, 4:] = 255
    path = tmp_path / "bw.png"
    Image.fromarray(pixels).save(path)
    out = prepare_image(path, (8, 8), (8, 8), random.Random(0))
    assert torch.equal(out.image[:, :, :4], torch.full((3, 8, 4), -1.0))
    assert torch.equal(out.image[:, :, 4:], torch.full((3, 8, 4), 1.0))


def test_default_interpolation_area_down_lanczos_up():
    assert pick_resample(None, (100, 100), (50, 50)) == Image.Resampling.BOX
    assert pick_resample(None, (50, 50), (100, 100)) == Image.Resampling.LANCZOS
    assert pick_resample(None, (100, 50), (50, 100)) == Image.Resampling.LANCZOS
    assert pick_resample("bicubic", (100, 100), (50, 50)) == Image.Resampling.BICUBIC
    with pytest.raises(UserError, match="resize_interpolation"):
        pick_resample("cubic-spline", (1, 1), (2, 2))


def test_color_aug_changes_about_a_third_of_images(tmp_path):
    path = write_image(tmp_path / "noise.png", (32, 32), seed=5)
    plain = prepare_image(path, (32, 32), (32, 32), random.Random(0)).image
    changed = 0
    for seed in range(150):
        out = prepare_image(path, (32, 32), (32, 32), random.Random(seed), color_aug=True).image
        again = prepare_image(path, (32, 32), (32, 32), random.Random(seed), color_aug=True).image
        assert torch.equal(out, again)  # same rng, same result
        if not torch.equal(out, plain):
            changed += 1
            assert (out - plain).abs().mean() < 0.5
    assert 25 <= changed <= 75  # p = 0.33 -> about 50 of 150


def test_face_crop_geometry():
    assert face_from_name(Path("img_50_40_20_20.png")) == (50, 40, 20, 20)
    assert face_from_name(Path("plain.png")) is None
    # range 2..2: the face (20 px) would need scale 64 / 40 > 1, so scale stays 1; crop centred on the face
    g = plan_face_crop((200, 160), (64, 64), (50, 40, 20, 20), (2.0, 2.0), random.Random(0))
    assert g.resized == (200, 160) and g.box == (18, 8, 82, 72)
    # a 200 px face with range 1..1 -> scale 64 / 200 = 0.32: 400 px -> 128 px, face centre 200 -> 64
    g = plan_face_crop((400, 400), (64, 64), (200, 200, 200, 200), (1.0, 1.0), random.Random(0))
    assert g.resized == (128, 128) and g.box == (32, 32, 96, 96)


def test_face_crop_through_prepare_image(tmp_path):
    pixels = np.zeros((160, 200, 3), np.uint8)
    pixels[30:50, 40:60] = 255  # the "face": a white 20x20 square centred at (50, 40)
    path = tmp_path / "img_50_40_20_20.png"
    Image.fromarray(pixels).save(path)
    out = prepare_image(path, (64, 64), (80, 64), random.Random(0), face_crop_aug_range=(2.0, 2.0), face_crop=True)
    white = (out.image[0] > 0).nonzero()
    assert white[:, 0].min() == 22 and white[:, 0].max() == 41  # rows 30..49 minus top 8
    assert white[:, 1].min() == 22 and white[:, 1].max() == 41  # cols 40..59 minus left 18
