"""What every dataset-preparation script shares: finding images, loading them in batches without letting a corrupt
file stop the run, writing side files (captions, tags, masks) without overwriting finished work, a progress bar with
images/s and the closing summary.

The scripts run on folders of thousands of images, often overnight. Re-running one after an interruption continues
where it stopped because every finished image already has its side file, which is skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from library.dataset.images import ImageLoadError, open_image
from library.dataset.scan import MASK_SUFFIX, image_extensions
from library.errors import UserError
from library.io import atomic_write_text

logger = logging.getLogger("sdtrain.prep")

T = TypeVar("T")


def find_images(folder: str | Path, recursive: bool = False, flag: str = "train_data_dir") -> list[Path]:
    """Image files in ``folder`` (and its sub-folders with ``recursive``), sorted, as sd-scripts' glob_images_pathlib.

    Mask files (``<stem>-masklabel.png``) are not images to caption or tag and are left out."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{flag} {folder}: folder not found")
    extensions = image_extensions()
    pattern = "**/*" if recursive else "*"
    found = [
        p
        for p in root.glob(pattern)
        if p.suffix.lower() in extensions and p.is_file() and not p.name.endswith(MASK_SUFFIX)
    ]
    return sorted(found)


def sidecar(image: Path, extension: str) -> Path:
    """The side file of an image: ``photo.png`` + ``.txt`` -> ``photo.txt`` (a missing leading dot is added)."""
    if not extension.startswith("."):
        extension = "." + extension
    return image.with_suffix(extension)


def pick_device(name: str | None, only_cpu_or_cuda: bool = True) -> torch.device:
    """``--device``: ``cuda`` when available and nothing was asked for, else CPU; an unusable choice is one line.
    The preparation scripts run on cpu or cuda only; ``gen_img.py`` also takes other torch devices (mps, xpu)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pick one")
    if only_cpu_or_cuda and device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: the preparation scripts run on cpu or cuda; use one of them")
    return device


def load_pretrained(loader: Callable[..., T], name_or_path: str, flag: str, **kwargs: Any) -> T:
    """``loader(name_or_path)`` (a transformers ``from_pretrained``), turning "not found" into one line that names
    the flag and the id. The local cache (or folder) is tried first, so a model already there loads at once even
    without a network, where the hub client would otherwise retry for minutes; only then is it downloaded."""
    try:
        return loader(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not on this machine yet: let the hub client download it
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        where = "folder" if Path(name_or_path).exists() else "model id"
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{flag} {name_or_path}: cannot load this {where} ({reason}); pass a local "
            "folder with the model files, or download the id first while online"
        ) from None


@dataclass
class PrepReport:
    """Counts for the closing summary line: images processed, skipped (already done), failed (unreadable) and
    files written."""

    what: str
    processed: int = 0
    skipped: int = 0
    written: int = 0
    failed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def fail(self, path: Path, reason: str) -> None:
        logger.warning("skipping %s: %s", path, reason)
        self.failed.append(str(path))

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        rate = f", {self.processed / seconds:.2f} images/s" if self.processed and seconds > 0 else ""
        return (
            f"{self.what}: {self.processed} processed, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed, {self.written} written in {seconds:.1f} s{rate}"
        )

    def log(self, outputs: str | None = None) -> None:
        logger.info(self.summary())
        if self.failed:
            logger.warning("unreadable images (not processed): %s", ", ".join(self.failed[:10]))
        if outputs:
            logger.info("output: %s", outputs)


def write_side_file(path: Path, text: str, overwrite: bool, report: PrepReport) -> bool:
    """Write ``text`` to ``path`` atomically unless it exists and ``overwrite`` is off; True when written."""
    if path.exists() and not overwrite:
        report.skipped += 1
        return False
    atomic_write_text(path, text)
    report.written += 1
    return True


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive batches of at most ``size`` items."""
    if size < 1:
        raise UserError(f"--batch_size {size}: must be 1 or more")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def load_batches(
    paths: Sequence[Path],
    batch_size: int,
    report: PrepReport,
    workers: int | None = None,
    opener: Callable[[Path], Image.Image] = open_image,
) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Decode images in threads (``--max_data_loader_n_workers``, default 2) and yield batches of (path, image),
    with a progress bar in images/s. Unreadable images are reported in ``report`` and left out of their batch."""
    bar = tqdm(total=len(paths), desc=report.what, unit="img", smoothing=0.0, dynamic_ncols=True)

    def load(path: Path) -> tuple[Path, Image.Image | str]:
        try:
            return path, opener(path)
        except ImageLoadError as e:
            return path, e.reason

    with ThreadPoolExecutor(max_workers=max(1, workers if workers is not None else 2)) as pool:
        try:
            for chunk in batched(paths, batch_size):
                batch = []
                for path, image in pool.map(load, chunk):
                    if isinstance(image, str):
                        report.fail(path, image)
                    else:
                        batch.append((path, image))
                if batch:
                    yield batch
                bar.update(len(chunk))
        finally:
            bar.close()


def todo(paths: Iterable[Path], done: Callable[[Path], bool], overwrite: bool, report: PrepReport) -> list[Path]:
    """The images still to process: those whose output ``done(path)`` says exists are counted as skipped, unless
    ``overwrite``. This is what makes a re-run continue where an interrupted one stopped."""
    remaining = []
    for path in paths:
        if not overwrite and done(path):
            report.skipped += 1
        else:
            remaining.append(path)
    return remaining


def add_common_arguments(parser: argparse.ArgumentParser, batch_size: int = 1) -> None:
    """Flags every preparation script takes: --recursive, --overwrite, --device, --batch_size, the loader threads
    and --debug."""
    parser.add_argument("--recursive", action="store_true", help="also process images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (default: skip them)")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="images per batch")
    parser.add_argument(
        "--max_data_loader_n_workers", type=int, default=None, help="threads decoding images (default 2)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and per-image details")
