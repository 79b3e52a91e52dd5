"""Writing real image files for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, mode: str = "RGB") -> Path:
    """Write a random-noise image of ``size`` (width, height); the format follows the file extension."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(data[..., 0] if channels == 1 else data, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
