"""``--debug_dataset``: show what the model would be trained on, batch by batch, without a display.

Prints each batch's bucket, image paths and processed captions; with ``--debug_dataset_dir`` also writes the
processed images (and masks) as PNG files, named ``e<epoch>_b<batch>_<item>_<stem>.png`` / ``..._mask.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.dataset.loader import TrainDataset
from library.io import atomic_path


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB")


def mask_to_image(mask: torch.Tensor) -> Image.Image:
    """(1, H, W) in [0, 1] -> 8-bit grey image."""
    return Image.fromarray((mask[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8), "L")


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def debug_dataset(
    train: TrainDataset,
    *,
    epochs: int = 1,
    out_dir: Path | None = None,
    max_batches: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[Path]:
    """Walk the batch plans of ``epochs`` epochs, print each batch and optionally write its images; returns the
    files written."""
    written: list[Path] = []
    shown = 0
    for epoch in range(1, epochs + 1):
        print_fn(f"epoch {epoch}")
        for plan in train.batch_plan(epoch):
            if max_batches is not None and shown >= max_batches:
                return written
            shown += 1
            batch = train.load_batch(plan)
            print_fn(f"batch {plan.index} (step {plan.global_step}): bucket {plan.bucket[0]}x{plan.bucket[1]}")
            if batch is None:
                print_fn("  every image of this batch failed to load")
                continue
            for n, (path, caption) in enumerate(zip(batch["paths"], batch["captions"])):
                flip = " (flipped)" if batch["flipped"][n] else ""
                print_fn(f"  {path}{flip}\n    caption: {caption}")
                if out_dir is None:
                    continue
                stem = f"e{epoch:03d}_b{plan.index:05d}_{n}_{Path(path).stem}"
                if batch["images"] is not None:
                    target = Path(out_dir) / f"{stem}.png"
                    _save_png(tensor_to_image(batch["images"][n]), target)
                    written.append(target)
                if batch["alpha_masks"] is not None:
                    target = Path(out_dir) / f"{stem}_mask.png"
                    _save_png(mask_to_image(batch["alpha_masks"][n]), target)
                    written.append(target)
            for path in batch["skipped"]:
                print_fn(f"  skipped (unreadable): {path}")
    return written
