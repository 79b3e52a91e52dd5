"""sd-scripts' ``tools/resize_images_to_resolution.py``: shrink every image of a folder to at most the pixel count of
each ``--max_resolution`` (aspect ratio kept, never enlarged), crop the sides to multiples of ``--divisible_by``
(centred) and save ``<stem>+<WxH>.jpg`` (``.png`` with ``--save_as_png``) in the destination folder.

Differences from sd-scripts, all on the safe side: Pillow only (its interpolation names map to Pillow filters in
``INTERPOLATIONS``); each resolution is made from the original image (sd-scripts shrinks the previous resolution's
output again, which can differ by a pixel and resamples twice); the EXIF orientation is applied (the output carries
no EXIF, so sd-scripts' output of a rotated photo shows sideways); an existing output is never overwritten without
``--overwrite``, so a re-run continues where an interrupted one stopped; a ``<stem>-masklabel.png`` loss mask is
resized and cropped with its image to ``<stem>+<WxH>-masklabel.png``; a corrupt image is reported and skipped.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from library.dataset.images import ImageLoadError, open_image, open_mask
from library.dataset.scan import MASK_SUFFIX
from library.errors import UserError
from library.io import atomic_save
from library.prep.common import PrepReport, find_images

logger = logging.getLogger("sdtrain.prep")

DEFAULT_RESOLUTIONS = "512x512,384x384,256x256,128x128"
# sd-scripts' --interpolation names (cv2's and PIL's) -> Pillow filters. cv2's INTER_AREA averages the source pixels
# each output pixel covers when shrinking, which is what Pillow's BOX filter does.
INTERPOLATIONS = {
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos4": Image.Resampling.LANCZOS,
    "linear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_RESOLUTION = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ResizeSettings:
    """resize_images_to_resolution.py's flags (names as the flags)."""

    src_img_folder: str
    dst_img_folder: str
    max_resolution: str = DEFAULT_RESOLUTIONS
    divisible_by: int = 1
    interpolation: str | None = None
    save_as_png: bool = False
    copy_associated_files: bool = False
    overwrite: bool = False
    max_data_loader_n_workers: int | None = None

    def __post_init__(self) -> None:
        if self.divisible_by < 1:
            raise UserError(f"--divisible_by {self.divisible_by}: must be 1 or more")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise UserError(f"--interpolation {self.interpolation}: use one of {', '.join(INTERPOLATIONS)}")
        resolutions(self.max_resolution)


def resolutions(text: str) -> list[tuple[str, int]]:
    """``"512x512, 384x384"`` -> [("512x512", 262144), ("384x384", 147456)]: the name used in output files and the
    largest pixel count."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        match = _RESOLUTION.match(part)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise UserError(
                f"--max_resolution {text}: {part!r} is not WIDTHxHEIGHT; write e.g. 512x512 (comma-separated for "
                "several)"
            )
        found.append((part, int(match[1]) * int(match[2])))
    return found


def plan_size(size: tuple[int, int], max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(resized (W, H), centred crop box (l, t, r, b)) for an image of ``size``: scaled down to at most
    ``max_pixels`` (never up), then each side cut down to a multiple of ``divisible_by``, as sd-scripts computes."""
    width, height = size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    crop_w, crop_h = width - width % divisible_by, height - height % divisible_by
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (width, height), (left, top, left + crop_w, top + crop_h)


def output_name(image: Path, resolution: str, png: bool) -> str:
    """sd-scripts' output name: ``photo.webp`` at ``512x512`` -> ``photo+512x512.jpg`` (``.png`` with png)."""
    return f"{image.stem}+{resolution}{'.png' if png else '.jpg'}"


def associated_files(image: Path, names: list[Path]) -> list[Path]:
    """Files with the image's stem and a non-image extension (``photo.txt``, ``photo.caption``, …)."""
    return [p for p in names if p.stem == image.stem and p != image]


def _fit(image: Image.Image, resized: tuple[int, int], box: tuple[int, ...], resample: Image.Resampling):
    if resized != image.size:
        image = image.resize(resized, resample)
    return image.crop(box) if box != (0, 0, *resized) else image


def _save_image(image: Image.Image, path: Path, png: bool) -> None:
    fmt = "PNG" if png or path.name.endswith(MASK_SUFFIX) else "JPEG"
    atomic_save(path, lambda tmp: image.save(tmp, format=fmt, quality=100), suffix=path.suffix)


def _copy(src: Path, dst: Path) -> None:
    atomic_save(dst, lambda tmp: shutil.copyfile(src, tmp), suffix=dst.suffix)


@dataclass
class _Outcome:
    written: int = 0
    error: str | None = None


def _resize_one(image_path: Path, settings: ResizeSettings, dst: Path, others: list[Path]) -> _Outcome:
    """Write every missing output of one image (its resized copies, its mask's and its associated files)."""
    outcome = _Outcome()
    todo = {
        k: v for k, v in _outputs(image_path, settings, dst, others).items() if settings.overwrite or not v.exists()
    }
    if not todo:
        return outcome
    try:
        image = open_image(image_path)
        mask_file = image_path.with_name(image_path.stem + MASK_SUFFIX)
        mask = open_mask(mask_file, image.size) if any(k[0] == "mask" for k in todo) else None
    except ImageLoadError as e:
        return _Outcome(error=e.reason)
    resample = INTERPOLATIONS[settings.interpolation or "area"]  # never enlarged: sd-scripts' default is area
    for label, pixels in resolutions(settings.max_resolution):
        resized, box = plan_size(image.size, pixels, settings.divisible_by)
        if box[2] <= box[0] or box[3] <= box[1]:
            return _Outcome(outcome.written, f"{image.size[0]}x{image.size[1]} is too small for {label}")
        for kind, picture in (("image", image), ("mask", mask)):
            target = todo.get((kind, label, ""))
            if target is not None and picture is not None:
                _save_image(_fit(picture, resized, box, resample), target, settings.save_as_png)
                logger.debug("%s %s: %dx%d as %s", image_path, kind, box[2] - box[0], box[3] - box[1], target.name)
                outcome.written += 1
    for (kind, _, name), target in todo.items():
        if kind == "file":
            _copy(image_path.with_name(name), target)
            outcome.written += 1
    return outcome


def _outputs(image: Path, settings: ResizeSettings, dst: Path, others: list[Path]) -> dict[tuple[str, str, str], Path]:
    """Every file one image makes, keyed (kind, resolution, source file name for kind "file")."""
    found: dict[tuple[str, str, str], Path] = {}
    has_mask = image.with_name(image.stem + MASK_SUFFIX).is_file()
    for label, _ in resolutions(settings.max_resolution):
        found[("image", label, "")] = dst / output_name(image, label, settings.save_as_png)
        if has_mask:
            found[("mask", label, "")] = dst / f"{image.stem}+{label}{MASK_SUFFIX}"
        if settings.copy_associated_files:
            for extra in associated_files(image, others):
                found[("file", label, extra.name)] = dst / f"{image.stem}+{label}{extra.suffix}"
    return found


def _unique_stems(images: list[Path], report: PrepReport) -> list[Path]:
    """Leave out (as failed) an image whose stem an earlier one has: both would write ``<stem>+<WxH>.jpg``."""
    first: dict[str, Path] = {}
    for path in images:
        if path.stem in first:
            report.fail(path, f"{first[path.stem].name} has the same name, and its outputs would overwrite; rename one")
        else:
            first[path.stem] = path
    return list(first.values())


def resize_folder(settings: ResizeSettings) -> PrepReport:
    """Resize every image of ``src_img_folder`` into ``dst_img_folder``; copy its other files there."""
    src, dst = Path(settings.src_img_folder), Path(settings.dst_img_folder)
    images = find_images(src, flag="src_img_folder")
    if dst.resolve() == src.resolve():
        raise UserError(f"dst_img_folder {dst}: is the source folder; write the resized images to another folder")
    dst.mkdir(parents=True, exist_ok=True)
    image_set = set(images)
    others = sorted(p for p in src.iterdir() if p.is_file() and p not in image_set and not p.name.endswith(MASK_SUFFIX))
    report = PrepReport("resize")
    images = _unique_stems(images, report)
    for other in others:  # sd-scripts copies every other file of the folder as it is (captions, metadata, …)
        target = dst / other.name
        if settings.overwrite or not target.exists():
            _copy(other, target)
            report.written += 1
    with (
        ThreadPoolExecutor(max(1, settings.max_data_loader_n_workers or 2)) as pool,
        tqdm(total=len(images), desc="resize", unit="img", smoothing=0.0, dynamic_ncols=True) as bar,
    ):
        for path, outcome in zip(images, pool.map(lambda p: _resize_one(p, settings, dst, others), images)):
            report.written += outcome.written
            if outcome.error is not None:
                report.fail(path, outcome.error)
            elif outcome.written:
                report.processed += 1
            else:
                report.skipped += 1
            bar.update(1)
    report.log(str(dst))
    return report
