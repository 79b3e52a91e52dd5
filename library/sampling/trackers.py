"""Send sample images to the run's experiment trackers (TensorBoard, Weights & Biases)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def log_images_to_trackers(
    accelerator: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    step: int,
    indices: Sequence[int] | None = None,
    suffix: str = "",
) -> None:
    """Log each image as ``sample_<i>`` (sd-scripts' wandb key; ``sample_<i><suffix>`` for a sample variant) to
    every TensorBoard / wandb tracker.

    ``i`` is the prompt's position in its file (``indices``; by default the image's position in ``images``), so a
    prompt keeps its key when another one failed. Only the main process logs; other tracker kinds are skipped.
    TensorBoard also gets the prompt as text.
    """
    if not accelerator.is_main_process:
        return
    keys = [f"{i}{suffix}" for i in (range(len(images)) if indices is None else indices)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image, prompt in zip(keys, images, prompts):
                pixels = np.asarray(image.convert("RGB"))
                tracker.writer.add_image(f"sample_{i}", pixels, global_step=step, dataformats="HWC")
                tracker.writer.add_text(f"sample_{i}/prompt", prompt, global_step=step)
        elif tracker.name == "wandb":
            import wandb

            logged = {
                f"sample_{i}": wandb.Image(image, caption=prompt) for i, image, prompt in zip(keys, images, prompts)
            }
            tracker.log(logged, step=step)
