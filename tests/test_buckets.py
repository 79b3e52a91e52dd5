"""Aspect-ratio buckets: exact tables worked out by hand, and properties over many random image sizes."""

from __future__ import annotations

import random

import pytest

from library.dataset.buckets import (
    BucketAssignment,
    BucketSettings,
    crop_ltrb,
    crop_top_left,
    make_bucket_resolutions,
    select_bucket,
    validate_settings,
)
from library.errors import UserError

SD15 = BucketSettings((512, 512), enable_bucket=True, min_reso=256, max_reso=1024, step=64)
NO_UPSCALE = BucketSettings((512, 512), enable_bucket=True, min_reso=256, max_reso=1024, step=64, no_upscale=True)


def test_table_for_512_matches_hand_computation():
    # width w in 256..1024 step 64, height = floor(262144 / w / 64) * 64 capped at 1024, both orientations, + 512x512
    assert make_bucket_resolutions(SD15) == [
        (256, 832), (256, 896), (256, 960), (256, 1024),
        (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320),
        (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip


def test_table_for_small_budget():
    settings = BucketSettings((256, 256), enable_bucket=True, min_reso=128, max_reso=512, step=64)
    assert make_bucket_resolutions(settings) == [
        (128, 384), (128, 448), (128, 512), (192, 320), (256, 256), (320, 192), (384, 128), (448, 128), (512, 128),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((512, 512), (512, 512), (512, 512)),  # exact table entry
        ((1000, 600), (640, 384), (640, 384)),  # aspect 5:3 exactly matches 640x384
        ((800, 600), (576, 448), (597, 448)),  # 4:3 nearest is 576x448 (1.286); 800 * 448/600 = 597.3
        ((600, 800), (448, 576), (448, 597)),
        ((768, 320), (768, 320), (768, 320)),  # in the table, kept even though 704x320 exists
        ((100, 10000), (256, 1024), (256, 25600)),  # far beyond the table: tallest bucket, cover then crop
    ],
)
def test_known_assignments(size, bucket, resized):
    assert select_bucket(size, SD15) == BucketAssignment(bucket, resized)


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((1000, 700), (576, 384), (576, 403)),  # shrunk to the area budget, width rounded to the step
        ((600, 500), (512, 448), (538, 448)),  # height rounding gives the closer aspect ratio
        ((640, 400), (640, 384), (640, 400)),  # within budget: no resize, crop 16 rows
        ((300, 200), (384, 256), (384, 256)),  # below min: enlarged just to 256 rows (sd-scripts: 256x192)
        ((50, 50), (256, 256), (256, 256)),  # sd-scripts gives a 0x0 bucket here
        ((4000, 100), (1024, 256), (10240, 256)),  # very long: capped at max, area kept
    ],
)
def test_no_upscale_assignments(size, bucket, resized):
    assert select_bucket(size, NO_UPSCALE) == BucketAssignment(bucket, resized)


def test_bucketing_disabled_uses_resolution():
    settings = BucketSettings((512, 768), enable_bucket=False)
    assert select_bucket((1000, 1000), settings) == BucketAssignment((512, 768), (768, 768))
    assert select_bucket((300, 200), settings) == BucketAssignment((512, 768), (1152, 768))


def _check_properties(settings: BucketSettings, size: tuple[int, int], a: BucketAssignment) -> None:
    bw, bh = a.bucket
    assert bw > 0 and bh > 0 and a.resized[0] > 0 and a.resized[1] > 0, (size, a)
    assert settings.min_reso <= bw <= settings.max_reso and settings.min_reso <= bh <= settings.max_reso, (size, a)
    assert bw % settings.step == 0 and bh % settings.step == 0, (size, a)
    assert bw * bh <= settings.max_area, (size, a)
    assert a.resized[0] >= bw and a.resized[1] >= bh, (size, a)  # covers the bucket: crop only
    aspect = size[0] / size[1]
    if 0.5 <= aspect <= 2:
        crop_per_side = max(a.resized[0] - bw, a.resized[1] - bh) / 2
        assert crop_per_side <= settings.step, (size, a)
    # the resize keeps the aspect ratio (to rounding)
    assert abs(a.resized[0] * size[1] - a.resized[1] * size[0]) <= size[0] + size[1], (size, a)


@pytest.mark.parametrize(
    "settings",
    [
        SD15,
        NO_UPSCALE,
        BucketSettings((768, 768), enable_bucket=True, min_reso=320, max_reso=1536, step=32),
        BucketSettings((640, 384), enable_bucket=True, min_reso=256, max_reso=1024, step=64, no_upscale=True),
        BucketSettings((1024, 1024), enable_bucket=True, min_reso=512, max_reso=2048, step=64),
    ],
)
def test_properties_over_random_sizes(settings):
    validate_settings(settings)
    rng = random.Random(1234)
    table = make_bucket_resolutions(settings)
    for _ in range(4000):
        if rng.random() < 0.3:
            size = (rng.randint(1, 200), rng.randint(1, 200))  # tiny images: the zero-size trap
        else:
            size = (rng.randint(1, 6000), rng.randint(1, 6000))
        _check_properties(settings, size, select_bucket(size, settings, table))


def test_crop_ltrb_matches_sd_scripts_convention():
    # bucket wider than the image: image fitted to the height, centred horizontally
    assert crop_ltrb((640, 384), (300, 300)) == (128, 0, 512, 384)
    # bucket taller than the image: fitted to the width
    assert crop_ltrb((384, 640), (400, 200)) == (0, 224, 384, 416)


def test_crop_top_left_as_sd_scripts_passes_it():
    # wide image in a wider bucket: fitted width 192 * 301 / 200 = 288.96, left (320 - 288.96) // 2 = 15; flipped,
    # sd-scripts takes int(320 - (15 + 288.96)) = 16 (not 320 minus the rounded right edge, 17)
    assert crop_top_left((320, 192), (301, 200), flipped=False) == (0, 15)
    assert crop_top_left((320, 192), (301, 200), flipped=True) == (0, 16)
    # tall image in a taller bucket: fitted height 192 * 301 / 200 = 288.96, top (320 - 288.96) // 2 = 15
    assert crop_top_left((192, 320), (200, 301), flipped=False) == (15, 0)
    assert crop_top_left((192, 320), (200, 301), flipped=True) == (15, 0)
    assert crop_top_left((1024, 1024), (1024, 1024), flipped=True) == (0, 0)


@pytest.mark.parametrize(
    "settings, key",
    [
        (BucketSettings((512, 512), True, 250, 1024, 64), "min_bucket_reso"),
        (BucketSettings((512, 512), True, 256, 448, 64), "max_bucket_reso"),
        (BucketSettings((512, 512), True, 256, 1024, 60), "bucket_reso_steps"),
        (BucketSettings((200, 200), True, 256, 1024, 64), "min_bucket_reso"),
        (BucketSettings((512, 512), True, 256, 1024, 1), "bucket_reso_steps"),
        (BucketSettings((512, 512), True, 256, 32768, 64), "max_bucket_reso"),
        (BucketSettings((20000, 512), False), "resolution"),
    ],
)
def test_bad_settings_are_user_errors(settings, key):
    with pytest.raises(UserError, match=key):
        validate_settings(settings, "datasets[0]")


def test_any_resolution_without_buckets_as_sd_scripts():
    # sd-scripts trains resolution = "512,650" with buckets off: one fixed bucket of exactly that size.
    settings = BucketSettings((512, 650), enable_bucket=False)
    validate_settings(settings)
    assert select_bucket((1024, 1300), settings) == BucketAssignment((512, 650), (512, 650))
    assert select_bucket((1000, 1000), settings) == BucketAssignment((512, 650), (650, 650))
