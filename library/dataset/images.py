"""Decode one training image (and its mask), resize and crop it to its bucket, augment it, make tensors.

The geometry (resize, crop box, flip, rotation) is decided once as a plain value and applied identically to the
image and its masks (same resampling: bilinear for rotation), so a mask always lines up with its image pixel for
pixel. Randomness comes from a ``random.Random`` the caller seeds, so results do not depend on worker processes or
call order.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.dataset.buckets import cover_size, crop_ltrb
from library.dataset.types import SubsetConfig
from library.errors import UserError
from library.losses import mask_from_conditioning_image

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,  # cv2's INTER_AREA is box averaging when shrinking; Pillow's BOX is the same idea
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}

HUE_SHIFT_LIMIT = 8  # sd-scripts' hue shift, in OpenCV hue units (0..180)
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, which OneTrainer's jitter uses


class ImageLoadError(Exception):
    """An image (or its mask) could not be decoded; the loader warns once, skips it and lists it at the end."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot read image ({reason})")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class Geometry:
    """How an image of ``original`` size becomes a training crop: scale to ``resized``, crop ``box`` (l, t, r, b
    in resized pixels), mirror left-right if ``flip``, then rotate ``angle`` degrees counter-clockwise about the
    crop's centre (same size; corners filled with black, so masks are 0 there)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False
    angle: float = 0.0


@dataclass(frozen=True)
class Jitter:
    """OneTrainer's per-sample rotation and colour jitter, 0 = off. A random strength x draws per sample (angle in
    [-x, x]; brightness/contrast/saturation factor in [1-x, 1+x], at least 0; hue shift in [-x/2, x/2] of the
    colour wheel); a ``*_fixed`` strength applies that amount every time (angle x, factor 1+x, hue shift x/2)."""

    rotate_max_angle: float = 0.0
    rotate_fixed_angle: float = 0.0
    brightness: float = 0.0
    brightness_fixed: float = 0.0
    contrast: float = 0.0
    contrast_fixed: float = 0.0
    saturation: float = 0.0
    saturation_fixed: float = 0.0
    hue: float = 0.0
    hue_fixed: float = 0.0

    @classmethod
    def of(cls, subset: SubsetConfig) -> Jitter:
        """The jitter a subset's ``rotate_aug_*``/``*_aug``/``*_aug_fixed`` keys ask for."""
        return cls(
            subset.rotate_aug_max_angle,
            subset.rotate_aug_fixed_angle,
            subset.brightness_aug,
            subset.brightness_aug_fixed,
            subset.contrast_aug,
            subset.contrast_aug_fixed,
            subset.saturation_aug,
            subset.saturation_aug_fixed,
            subset.hue_aug,
            subset.hue_aug_fixed,
        )

    def angle(self, rng: random.Random) -> float:
        """This sample's rotation in degrees (one draw from ``rng`` when random rotation is on)."""
        if self.rotate_max_angle > 0:
            return rng.uniform(-self.rotate_max_angle, self.rotate_max_angle)
        return self.rotate_fixed_angle

    def colour_factors(self, rng: random.Random) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue shift) for this sample, drawn in that order from ``rng``."""
        factors = [
            max(0.0, rng.uniform(1 - strength, 1 + strength)) if strength > 0 else 1.0 + fixed
            for strength, fixed in (
                (self.brightness, self.brightness_fixed),
                (self.contrast, self.contrast_fixed),
                (self.saturation, self.saturation_fixed),
            )
        ]
        hue = min(0.5, max(-0.5, rng.uniform(-self.hue / 2, self.hue / 2))) if self.hue > 0 else self.hue_fixed / 2
        return factors[0], factors[1], factors[2], hue


@dataclass(frozen=True)
class PreparedImage:
    """One processed sample: ``image`` (3, H, W) in [-1, 1]; ``mask`` (1, H, W) in [0, 1] or None."""

    image: torch.Tensor
    mask: torch.Tensor | None
    original_size: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]
    flipped: bool


def check_interpolation(name: str | None, where: str = "resize_interpolation") -> None:
    if name is not None and name not in INTERPOLATIONS:
        raise UserError(f"{where}: unknown interpolation {name!r}; use one of {', '.join(sorted(INTERPOLATIONS))}")


def pick_resample(name: str | None, src: tuple[int, int], dst: tuple[int, int]) -> Image.Resampling:
    """sd-scripts' default: area when shrinking (both sides), Lanczos when enlarging; or the named method."""
    if name is None:
        name = "area" if src[0] >= dst[0] and src[1] >= dst[1] else "lanczos"
    check_interpolation(name)
    return INTERPOLATIONS[name]


def open_image(path: Path, keep_alpha: bool = False) -> Image.Image:
    """Decode fully, apply the EXIF orientation and convert to RGB (RGBA when ``keep_alpha``)."""
    try:
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
            mode = "RGBA" if keep_alpha else "RGB"
            return image.convert(mode) if image.mode != mode else image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def open_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask file as 8-bit grey at ``size`` (white = train, black = ignore)."""
    try:
        with Image.open(path) as raw:
            raw.load()
            mask = ImageOps.exif_transpose(raw).convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(path, f"mask: {type(e).__name__}: {e}") from e
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def open_conditioning_mask(
    path: Path, size: tuple[int, int], geometry: Geometry, interpolation: str | None
) -> torch.Tensor:
    """sd-scripts' ``--masked_loss`` mask from a conditioning image: the RGB image is sized to the training image,
    given the same resize/crop/flip, scaled to [-1, 1] and its red channel mapped to [0, 1]; (1, H, W)."""
    image = open_image(path)
    if image.size != size:
        image = image.resize(size, pick_resample(interpolation, image.size, size))
    pixels = to_tensor(np.asarray(apply_geometry(image, geometry, interpolation)))
    return mask_from_conditioning_image(pixels.unsqueeze(0))[0]


def face_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """sd-scripts' face position in the file name: ``<name>_<cx>_<cy>_<w>_<h>.<ext>``; None when absent."""
    tokens = path.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, fw, fh = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, fw, fh) if cx > 0 and max(fw, fh) > 0 else None


def plan_geometry(
    original: tuple[int, int],
    bucket: tuple[int, int],
    resized: tuple[int, int],
    rng: random.Random,
    random_crop: bool = False,
    flip: bool = False,
) -> Geometry:
    """Crop ``resized`` down to ``bucket``: centred (sd-scripts: offset = excess // 2) or uniformly random."""
    offsets = []
    for have, want in zip(resized, bucket):
        excess = have - want
        offsets.append(rng.randint(0, excess) if random_crop and excess > 0 else excess // 2)
    left, top = offsets
    return Geometry(original, resized, (left, top, left + bucket[0], top + bucket[1]), flip)


def plan_face_crop(
    original: tuple[int, int],
    target: tuple[int, int],
    face: tuple[int, int, int, int],
    face_range: tuple[float, float],
    rng: random.Random,
    random_crop: bool = False,
    flip: bool = False,
) -> Geometry:
    """sd-scripts' face crop: scale so the face is 1/range[1]..1/range[0] of the short target side (never
    enlarging, never below covering the target), then crop ``target`` centred on the face (jittered a little)."""
    width, height = original
    tw, th = target
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    short = min(tw, th)
    cover = max(th / height, tw / width)
    min_scale = min(1.0, max(cover, short / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nw, nh = max(tw, int(width * scale + 0.5)), max(th, int(height * scale + 0.5))
    centre = (int(cx * scale + 0.5), int(cy * scale + 0.5))
    offsets = []
    for want, length, pos in zip((tw, th), (nw, nh), centre):
        start = pos - want // 2
        if random_crop:
            spread = max(length - pos, pos)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - want)))
    left, top = offsets
    return Geometry(original, (nw, nh), (left, top, left + tw, top + th), flip)


def apply_geometry(image: Image.Image, geometry: Geometry, interpolation: str | None) -> Image.Image:
    """Resize, crop, flip and rotate one single-band or RGB image (alpha is split off by the caller, so colour
    under transparent pixels is kept, unlike Pillow's premultiplied RGBA resize). Rotation is bilinear for images
    and masks alike (as OneTrainer), so a mask's edge blends exactly as its image's does."""
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, pick_resample(interpolation, image.size, geometry.resized))
    image = image.crop(geometry.box)
    if geometry.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if geometry.angle:
        image = image.rotate(geometry.angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return image


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour augmentation on uint8 RGB: with probability 0.33, either a hue shift of up to 8/180 of
    the colour wheel or a gamma in [0.95, 1.05], half of the time each."""
    if rng.random() > 0.33:
        return pixels
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT) * 256.0 / 180.0
        hsv = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + shift) % 256).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def jitter_colours(pixels: np.ndarray, factors: tuple[float, float, float, float]) -> np.ndarray:
    """OneTrainer's colour jitter on uint8 RGB, in its order and with torchvision's formulas: brightness scales,
    contrast blends with the mean grey level, saturation with each pixel's grey, hue rotates the colour wheel."""
    brightness, contrast, saturation, hue = factors
    if (brightness, contrast, saturation, hue) == (1.0, 1.0, 1.0, 0.0):
        return pixels
    x = pixels.astype(np.float64) / 255.0
    if brightness != 1.0:
        x = np.clip(x * brightness, 0.0, 1.0)
    if contrast != 1.0:
        x = np.clip(contrast * x + (1.0 - contrast) * _grey(x).mean(), 0.0, 1.0)
    if saturation != 1.0:
        x = np.clip(saturation * x + (1.0 - saturation) * _grey(x)[..., None], 0.0, 1.0)
    if hue != 0.0:
        x = _shift_hue(x, hue)
    return np.round(x * 255.0).astype(np.uint8)


def _grey(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * GREY_WEIGHTS[0] + x[..., 1] * GREY_WEIGHTS[1] + x[..., 2] * GREY_WEIGHTS[2]


def _shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """RGB in [0, 1] -> HSV, hue + ``shift`` (a fraction of the wheel, wrapping) -> RGB."""
    high, low = x.max(axis=-1), x.min(axis=-1)
    delta = high - low
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = ((high - x[..., k]) / safe for k in range(3))
    h = np.where(high == x[..., 0], b - g, np.where(high == x[..., 1], 2.0 + r - b, 4.0 + g - r))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
    h = ((h + shift) % 1.0) * 6.0
    sector = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    v = high
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([v, t, p, q, v, p, p, v, t, p, q, v, t, p, v, v, p, q], axis=-1).reshape(*v.shape, 6, 3)
    return np.take_along_axis(table, sector[..., None, None], axis=-2)[..., 0, :]


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """8-bit grey -> float (1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0)


def prepare_image(
    path: Path,
    bucket: tuple[int, int],
    resized: tuple[int, int],
    rng: random.Random,
    *,
    flip: bool = False,
    random_crop: bool = False,
    color_aug: bool = False,
    face_crop_aug_range: tuple[float, float] | None = None,
    alpha_mask: bool = False,
    mask_path: Path | None = None,
    interpolation: str | None = None,
    face_crop: bool = False,
    conditioning_path: Path | None = None,
    jitter: Jitter | None = None,
) -> PreparedImage:
    """Load ``path`` and return its training crop at ``bucket`` with augmentations applied.

    ``resized`` is the cover size from bucket assignment (computed from the header size); when the decoded size
    differs (e.g. EXIF rotation the scan did not apply) the cover size is recomputed from the decoded image.
    ``face_crop`` enables sd-scripts' face crop (only used without bucketing, and only for names carrying a face
    position). Masks: the alpha channel (``alpha_mask``), ``mask_path`` and ``conditioning_path`` (sd-scripts'
    ``--masked_loss`` mask: the red channel of the conditioning image); several present -> their product.
    ``jitter``: OneTrainer's rotation (image and masks alike) and colour jitter, drawn from ``rng`` after the crop
    and ``color_aug`` draws (so runs without it draw exactly as before).
    """
    image = open_image(path, keep_alpha=alpha_mask)
    original = image.size
    if _aspect_differs(original, resized):
        resized = cover_size(original, bucket)
    face = face_from_name(path) if face_crop and face_crop_aug_range else None
    if face is not None:
        geometry = plan_face_crop(original, bucket, face, face_crop_aug_range, rng, random_crop, flip)
    else:
        geometry = plan_geometry(original, bucket, resized, rng, random_crop, flip)
    if jitter is not None:
        geometry = dataclasses.replace(geometry, angle=jitter.angle(rng))

    masks: list[Image.Image | torch.Tensor] = []
    if alpha_mask:
        masks.append(image.getchannel("A"))
        image = image.convert("RGB")
    if mask_path is not None:
        masks.append(open_mask(mask_path, original))
    if conditioning_path is not None:
        masks.append(open_conditioning_mask(conditioning_path, original, geometry, interpolation))

    pixels = np.asarray(apply_geometry(image, geometry, interpolation))
    if color_aug:
        pixels = color_augment(pixels, rng)
    if jitter is not None:
        pixels = jitter_colours(pixels, jitter.colour_factors(rng))
    mask = None
    for m in masks:
        t = m if isinstance(m, torch.Tensor) else mask_to_tensor(apply_geometry(m, geometry, interpolation))
        mask = t if mask is None else mask * t
    return PreparedImage(to_tensor(pixels), mask, original, crop_ltrb(bucket, original), geometry.flip)


def _aspect_differs(original: tuple[int, int], resized: tuple[int, int]) -> bool:
    """True when ``resized`` was not derived from an image of ``original`` size (e.g. width and height swapped)."""
    return abs(original[0] * resized[1] - original[1] * resized[0]) > original[0] + original[1]
