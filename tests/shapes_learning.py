"""Shared by the learning tests: sample the bundled tiny-shapes model (optionally with a LoRA or other trained
weights already applied to its components) and score the images with the tiny-shapes evaluator."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from library.generate.images import ImageRequest, render
from library.models.components import Components
from library.shapes.evaluate import judge
from library.text.encode import TextEncodingSettings

REPO = Path(__file__).resolve().parents[1]
CONCEPT_FOLDER = REPO / "examples" / "dataset" / "20_sks circle"
SAMPLE_STEPS = 12
SAMPLE_SCALE = 5.0


def sample(
    components: Components, prompt: str, seeds: Sequence[int], size: tuple[int, int] = (64, 64)
) -> list[Image.Image]:
    """``prompt`` rendered once per seed with DDIM (``SAMPLE_STEPS`` steps, CFG ``SAMPLE_SCALE``) on the CPU."""
    requests = [ImageRequest(prompt, "", size[0], size[1], SAMPLE_STEPS, SAMPLE_SCALE, "ddim", s) for s in seeds]
    with torch.no_grad():
        return render(components, requests, TextEncodingSettings(), torch.device("cpu"))


def hollow_share(images: Sequence[Image.Image]) -> float:
    """The share of ``images`` the evaluator judges hollow (a ring): the part of the concept the base never draws."""
    return sum(judge(image).hollow for image in images) / len(images)


def concept_run_args(train_data_dir: Path) -> list[str]:
    """The flags the learning runs on the concept images share: the bundled model, ``.txt`` captions from
    ``train_data_dir``, 64 px, batch 4 and cached latents."""
    return [
        *("--pretrained_model_name_or_path", "tiny-shapes", "--train_data_dir", str(train_data_dir)),
        *("--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", "4", "--cache_latents"),
    ]


def copy_concept_images(folder: Path, count: int | None = None) -> Path:
    """The example concept images (orange rings captioned ``a sks circle on a ... background``) copied to
    ``folder`` (the first ``count`` when given); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(CONCEPT_FOLDER.glob("*.png"))[:count]
    for image in images:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder
