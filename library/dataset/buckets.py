"""Aspect-ratio buckets: which (width, height) each image is trained at, and how it is resized and cropped to it.

Follows sd-scripts' ``BucketManager``: ``resolution`` is an area budget, buckets are multiples of
``bucket_reso_steps`` between ``min_bucket_reso`` and ``max_bucket_reso``, an image goes to the bucket with the
nearest aspect ratio and is scaled to cover it, then cropped. With ``bucket_no_upscale`` every image gets its own
bucket (its size, shrunk to the area budget, rounded down to the step), so images are never enlarged.

Beyond sd-scripts: no bucket side is ever zero or outside [min, max] (sd-scripts gives 0-wide buckets to images
smaller than one step under ``bucket_no_upscale``, and unbounded sides to very long images); an image too small
for the minimum bucket is enlarged just enough to cover it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from library.dataset.types import DatasetConfig
from library.errors import UserError

LATENT_STRIDE = 8  # the SD VAE downsamples 8x; bucket sides must be multiples of it
MAX_SIDE = 16384  # largest resolution side or bucket side accepted (also bounds the bucket table's size)


@dataclass(frozen=True)
class BucketSettings:
    """The bucket settings of one dataset; ``resolution`` is (width, height)."""

    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False

    @classmethod
    def from_dataset(cls, dataset: DatasetConfig) -> BucketSettings:
        return cls(
            resolution=tuple(dataset.resolution),
            enable_bucket=dataset.enable_bucket,
            min_reso=dataset.min_bucket_reso,
            max_reso=dataset.max_bucket_reso,
            step=dataset.bucket_reso_steps,
            no_upscale=dataset.bucket_no_upscale,
        )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: ``bucket`` is the training size, ``resized`` the size it is scaled to before cropping.

    ``resized`` covers ``bucket`` on both axes (resized >= bucket), so only cropping is needed afterwards.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]


def check_step(step: int, where: str, name: str = "bucket_reso_steps") -> None:
    """Bucket sides move in steps that are a positive multiple of 8 (the VAE's stride); ``name`` is the key or flag.

    sd-scripts demands a multiple of 64 (SD 1.x/2.x) or 32 (SDXL); any multiple of 8 gives valid latents (diffusers'
    UNet accepts latent sizes off its downsampling grid), so smaller steps are allowed here.
    """
    if step <= 0 or step % LATENT_STRIDE:
        raise UserError(
            f"{where}: {name} = {step} must be a positive multiple of {LATENT_STRIDE} when buckets are on "
            "(every bucket side is a multiple of it); use 64, or 32 for SDXL, as sd-scripts does"
        )


def validate_settings(settings: BucketSettings, where: str = "dataset") -> None:
    """Raise a UserError naming ``where`` and the offending key when the settings cannot produce valid buckets.

    Without buckets any resolution is trained as given (sd-scripts does not require multiples of 8 or 64 there: the
    VAE rounds the latent size down and the UNet pads odd sizes).
    """
    width, height = settings.resolution
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise UserError(f"{where}: resolution {width}x{height} must be from 1 to {MAX_SIDE} per side; e.g. 512")
    if not settings.enable_bucket:
        return
    step = settings.step
    check_step(step, where)
    if settings.max_reso > MAX_SIDE:
        raise UserError(f"{where}: max_bucket_reso ({settings.max_reso}) must be at most {MAX_SIDE}; e.g. 1024")
    if settings.min_reso % step or settings.max_reso % step:
        raise UserError(
            f"{where}: min_bucket_reso ({settings.min_reso}) and max_bucket_reso ({settings.max_reso}) must be "
            f"multiples of bucket_reso_steps ({step}); e.g. 256 and 1024 with step 64"
        )
    if not 0 < settings.min_reso <= settings.max_reso:
        raise UserError(
            f"{where}: min_bucket_reso ({settings.min_reso}) must be positive and at most max_bucket_reso "
            f"({settings.max_reso})"
        )
    if settings.max_reso < max(width, height):
        raise UserError(
            f"{where}: max_bucket_reso ({settings.max_reso}) is smaller than the resolution {width}x{height}; "
            "raise max_bucket_reso or lower resolution"
        )
    if settings.min_reso * settings.min_reso > settings.max_area:
        raise UserError(
            f"{where}: min_bucket_reso ({settings.min_reso}) squared exceeds the resolution area {width}x{height}, "
            "so no bucket fits; lower min_bucket_reso or raise resolution"
        )


def make_bucket_resolutions(settings: BucketSettings) -> list[tuple[int, int]]:
    """The predefined buckets (sorted (width, height) pairs): every step-multiple width in [min, max] with the
    tallest step-multiple height whose area stays within the budget, both orientations, plus the largest square."""
    step, lo, hi, area = settings.step, settings.min_reso, settings.max_reso, settings.max_area
    resos: set[tuple[int, int]] = set()
    square = int(math.isqrt(area) // step) * step
    if lo <= square <= hi:
        resos.add((square, square))
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def cover_size(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size ``image_size`` is scaled to so that it covers ``bucket`` with the aspect ratio kept (sd-scripts'
    rule: match the side that leaves the other one at least as large as the bucket, round half up)."""
    width, height = image_size
    bw, bh = bucket
    if width / height > bw / bh:
        scale = bh / height
        resized = (int(width * scale + 0.5), bh)
    else:
        scale = bw / width
        resized = (bw, int(height * scale + 0.5))
    return max(resized[0], bw), max(resized[1], bh)


def select_bucket(
    image_size: tuple[int, int], settings: BucketSettings, table: list[tuple[int, int]] | None = None
) -> BucketAssignment:
    """Pick the bucket and resize target for one image of ``image_size`` (width, height).

    ``table`` is ``make_bucket_resolutions(settings)``; pass it when assigning many images to avoid rebuilding it.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not settings.enable_bucket:
        bucket = tuple(settings.resolution)
        return BucketAssignment(bucket, cover_size(image_size, bucket))
    if settings.no_upscale:
        return _select_no_upscale(image_size, settings)
    if table is None:
        table = make_bucket_resolutions(settings)
    if image_size in table:
        bucket = image_size
    else:
        aspect = width / height
        bucket = min(table, key=lambda r: abs(r[0] / r[1] - aspect))  # first of equals, like numpy's argmin
    return BucketAssignment(bucket, cover_size(image_size, bucket))


def _round_to_step(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def _select_no_upscale(image_size: tuple[int, int], settings: BucketSettings) -> BucketAssignment:
    """sd-scripts' per-image bucket: shrink to the area budget if larger, then crop to a multiple of the step."""
    width, height = image_size
    step, area = settings.step, settings.max_area
    aspect = width / height
    if width * height > area:
        resized_w = math.sqrt(area * aspect)
        resized_h = area / resized_w
        by_width = _round_to_step(resized_w, step)
        by_height = _round_to_step(resized_h, step)
        height_for_width = _round_to_step(by_width / aspect, step)
        width_for_height = _round_to_step(by_height * aspect, step)
        err_w = abs(by_width / height_for_width - aspect) if height_for_width > 0 else math.inf
        err_h = abs(width_for_height / by_height - aspect) if by_height > 0 else math.inf
        if err_w < err_h:
            resized = (by_width, int(by_width / aspect + 0.5))
        else:
            resized = (int(by_height * aspect + 0.5), by_height)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if _within_limits(bucket, settings) and resized[0] > 0 and resized[1] > 0:
        return BucketAssignment(bucket, resized)
    bucket = _clamp_bucket(image_size, settings)
    return BucketAssignment(bucket, cover_size(image_size, bucket))


def _within_limits(bucket: tuple[int, int], settings: BucketSettings) -> bool:
    lo, hi = settings.min_reso, settings.max_reso
    return lo <= bucket[0] <= hi and lo <= bucket[1] <= hi and bucket[0] * bucket[1] <= settings.max_area


def _clamp_bucket(image_size: tuple[int, int], settings: BucketSettings) -> tuple[int, int]:
    """Legal bucket for an image sd-scripts' rule puts out of bounds: shrink to the area budget, but enlarge until
    the short side reaches ``min_reso``; sides beyond ``max_reso`` or the area budget are cropped off."""
    width, height = image_size
    step, lo, hi, area = settings.step, settings.min_reso, settings.max_reso, settings.max_area
    scale = max(min(1.0, math.sqrt(area / (width * height))), lo / min(width, height))

    def clamp(x: float) -> int:
        return min(hi, max(lo, int(x) // step * step))

    bw, bh = clamp(width * scale), clamp(height * scale)
    if bw * bh > area:
        if bw >= bh:
            bw = max(lo, area // bh // step * step)
        else:
            bh = max(lo, area // bw // step * step)
    return bw, bh


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """sd-scripts' ``crop_ltrb`` for the latent cache: where the image would sit if fitted inside the bucket
    (Stability AI's convention, used by SDXL conditioning); stored for compatibility, not used to crop."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = image_size[0] / image_size[1]
    if bucket_aspect > image_aspect:
        fitted_w, fitted_h = bucket[1] * image_aspect, float(bucket[1])
    else:
        fitted_w, fitted_h = float(bucket[0]), bucket[0] / image_aspect
    left = (bucket[0] - fitted_w) // 2
    top = (bucket[1] - fitted_h) // 2
    return int(left), int(top), int(left + fitted_w), int(top + fitted_h)


def crop_top_left(bucket: tuple[int, int], image_size: tuple[int, int], flipped: bool) -> tuple[int, int]:
    """SDXL's ``crop_top_left`` (top, left) as sd-scripts passes it: the top-left of ``crop_ltrb`` (a random crop's
    offset is not reflected, as in sd-scripts); when flipped, left is the bucket width minus the unrounded right edge.
    """
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = image_size[0] / image_size[1]
    if bucket_aspect > image_aspect:
        fitted_w, fitted_h = bucket[1] * image_aspect, bucket[1]
    else:
        fitted_w, fitted_h = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - fitted_w) // 2
    top = (bucket[1] - fitted_h) // 2
    return int(top), int(bucket[0] - (left + fitted_w) if flipped else left)
