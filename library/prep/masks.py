"""Loss masks for ``--masked_loss``: ``<stem>-masklabel.png`` beside each image (white = train, black = ignore),
from a text prompt with CLIPSeg or from the image's alpha channel, as OneTrainer's dataset tools make them.

CLIPSeg's masks follow OneTrainer's recipe: sigmoid of the logits, a box blur of ``smooth_pixels`` at the model's
resolution, a bilinear resize to the image's size, ``> threshold``, then every mask pixel grown by
``expand_pixels`` in all directions (a square). Several prompts give the union of their masks (OneTrainer averages
the prompts' probabilities instead, which halves a region only one prompt finds).

Modes decide what happens to an existing mask:

- ``fill`` (default): only images without a mask get one; existing masks are never touched.
- ``replace``: a new mask for every image; an existing mask is replaced only with ``--overwrite`` (without it,
  existing masks are kept and counted as skipped, so a re-run resumes).
- ``add``: existing mask OR new mask; an image without a mask gets the new one.
- ``subtract``: existing mask AND NOT new mask; an image without a mask counts as all white (training uses the
  whole image then), so it gets the inverse of the new mask ("everything except the watermark").

``add`` and ``subtract`` give the same file when run twice, so re-running them after an interruption is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.dataset.images import ImageLoadError, open_image, open_mask
from library.dataset.scan import MASK_SUFFIX
from library.errors import UserError
from library.io import atomic_save
from library.prep.common import PrepReport, find_images, load_batches, load_pretrained, pick_device, todo

logger = logging.getLogger("sdtrain.prep")

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
MODES = ("fill", "replace", "add", "subtract")


@dataclass(frozen=True)
class MaskSettings:
    """make_masks.py's flags (names as the flags)."""

    train_data_dir: str
    prompts: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    alpha: bool = False
    threshold: float = 0.3
    smooth_pixels: int = 5
    expand_pixels: int = 10
    mode: str = "fill"
    recursive: bool = False
    overwrite: bool = False
    device: str | None = None
    batch_size: int = 1
    max_data_loader_n_workers: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode}: unknown mode; use one of {', '.join(MODES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold {self.threshold}: must be between 0 and 1")
        for flag in ("smooth_pixels", "expand_pixels"):
            if getattr(self, flag) < 0:
                raise UserError(f"--{flag} {getattr(self, flag)}: must be 0 or more")
        if self.alpha and self.prompts:
            raise UserError("--alpha takes the mask from the alpha channel; leave out --prompt, or leave out --alpha")
        if not self.alpha and not self.prompts:
            raise UserError("--prompt is required (what to mask, e.g. --prompt 'a face'), or pass --alpha")


def split_prompts(values: list[str] | None) -> tuple[str, ...]:
    """``--prompt`` values, repeated and/or comma-separated, as one tuple without empty entries."""
    return tuple(p.strip() for value in values or () for p in value.split(",") if p.strip())


def mask_path(image: Path) -> Path:
    """Where training's ``--masked_loss`` looks for an image's mask: ``photo.jpg`` -> ``photo-masklabel.png``."""
    return image.with_name(image.stem + MASK_SUFFIX)


def smooth(probabilities: torch.Tensor, radius: int) -> torch.Tensor:
    """Box blur of (N, 1, H, W) with a (2r+1)² window, edges repeated (OneTrainer's smoothing kernel)."""
    if radius == 0:
        return probabilities
    padded = F.pad(probabilities, (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, 2 * radius + 1, stride=1)


def expand(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a 0/1 mask (N, 1, H, W) by ``radius`` pixels in every direction (a square window, taken as a row then
    a column pass: the same result, several times faster for large radii)."""
    if radius == 0:
        return mask
    side = 2 * radius + 1
    rows = F.max_pool2d(mask, (1, side), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, (side, 1), stride=1, padding=(radius, 0))


def probability_to_mask(
    probability: torch.Tensor, size: tuple[int, int], threshold: float, smooth_pixels: int, expand_pixels: int
) -> np.ndarray:
    """A (h, w) probability map at model resolution -> a uint8 mask (H, W) at the image's ``size`` (W, H): blur,
    bilinear resize, ``> threshold``, expand; 255 = train."""
    grid = smooth(probability[None, None].float(), smooth_pixels)
    grid = F.interpolate(grid, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    binary = expand((grid > threshold).float(), expand_pixels)
    return (binary[0, 0] * 255).to(torch.uint8).cpu().numpy()


def alpha_to_mask(image: Image.Image) -> np.ndarray:
    """The alpha channel as the mask (transparent = ignore), soft edges kept; an image without alpha is all white."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    return np.asarray(image.getchannel("A"), dtype=np.uint8).copy()


def combine(existing: np.ndarray | None, new: np.ndarray, mode: str) -> np.ndarray:
    """The mask to write in ``mode`` given the existing mask (None: the image has none) and the new one (uint8)."""
    if mode == "add":
        return new if existing is None else np.maximum(existing, new)
    if mode == "subtract":
        whole = np.full_like(new, 255) if existing is None else existing
        return np.minimum(whole, 255 - new)
    return new


class ClipSegMasker:
    """CLIPSeg (``--model``) on ``device``: a batch of images -> one union-of-prompts probability map per image."""

    def __init__(self, model: str, prompts: tuple[str, ...], device: torch.device):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.processor = load_pretrained(CLIPSegProcessor.from_pretrained, model, "--model")
        self.model = load_pretrained(CLIPSegForImageSegmentation.from_pretrained, model, "--model")
        self.model.to(device).eval()
        self.prompts = prompts
        self.device = device

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, h, w) at the model's resolution: per pixel, the highest sigmoid over the prompts."""
        count = len(self.prompts)
        inputs = self.processor(
            text=list(self.prompts) * len(images),
            images=[image for image in images for _ in range(count)],
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**inputs).logits
        logits = logits.reshape(len(images), count, *logits.shape[-2:])
        return torch.sigmoid(logits.float()).amax(dim=1)


def _existing(image_path: Path, size: tuple[int, int], mode: str) -> np.ndarray | None:
    """The image's current mask at its size (add/subtract only; None when it has none)."""
    path = mask_path(image_path)
    if mode not in ("add", "subtract") or not path.is_file():
        return None
    return np.asarray(open_mask(path, size), dtype=np.uint8)


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Save a uint8 (H, W) mask as an 8-bit grey PNG, atomically."""
    image = Image.fromarray(mask, "L")
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def make_masks(settings: MaskSettings) -> PrepReport:
    """Write the masks of every image under ``settings.train_data_dir`` the mode asks for; return the counts."""
    images = find_images(settings.train_data_dir, settings.recursive)
    report = PrepReport("masks")
    if settings.mode in ("fill", "replace"):
        overwrite = settings.mode == "replace" and settings.overwrite
        images = todo(images, lambda p: mask_path(p).exists(), overwrite, report)
        if settings.mode == "replace" and report.skipped:
            logger.warning(
                "%d image(s) already have a mask, kept (--mode replace without --overwrite); add --overwrite to "
                "replace them",
                report.skipped,
            )
    logger.info("%d image(s) to mask (%s mode)", len(images), settings.mode)
    if images:
        _run(images, settings, report)
    report.log(f"<image stem>{MASK_SUFFIX} beside each image")
    return report


def _run(images: list[Path], settings: MaskSettings, report: PrepReport) -> None:
    masker = None if settings.alpha else ClipSegMasker(settings.model, settings.prompts, pick_device(settings.device))
    opener: Callable[[Path], Image.Image] = (lambda p: open_image(p, keep_alpha=True)) if settings.alpha else open_image
    for batch in load_batches(images, settings.batch_size, report, settings.max_data_loader_n_workers, opener):
        probabilities = masker.probabilities([image for _, image in batch]) if masker is not None else None
        for i, (path, image) in enumerate(batch):
            if probabilities is None:
                new = alpha_to_mask(image)
            else:
                new = probability_to_mask(
                    probabilities[i], image.size, settings.threshold, settings.smooth_pixels, settings.expand_pixels
                )
            try:
                existing = _existing(path, image.size, settings.mode)
            except ImageLoadError as e:
                report.fail(path, f"its mask {mask_path(path).name} is unreadable ({e.reason}); fix or delete it")
                continue
            write_mask(mask_path(path), combine(existing, new, settings.mode))
            report.processed += 1
            report.written += 1
