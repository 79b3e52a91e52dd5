"""A tiny WD14-style ONNX tagger whose outputs are known in advance, for tests, docs and benchmarks.

Each tag's probability is ``clip(bias + r*R + g*G + b*B, 0, 1)`` where R, G, B are the image's mean red, green and
blue in [0, 1] (the model reads sd-scripts' BGR 0-255 NHWC input). A plain red square therefore scores exactly
``bias + r`` for every tag. The folder holds ``model.onnx`` and ``selected_tags.csv`` as SmilingWolf's taggers do.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

RATING, GENERAL, CHARACTER = 9, 0, 4

# name, category, bias, red, green, blue weight
TAGS: tuple[tuple[str, int, float, float, float, float], ...] = (
    ("general", RATING, 0.5, 0.3, 0.0, 0.0),
    ("sensitive", RATING, 0.1, 0.0, 0.0, 0.8),
    ("questionable", RATING, 0.2, 0.0, 0.0, 0.0),
    ("explicit", RATING, 0.05, 0.0, 0.0, 0.0),
    ("1girl", GENERAL, 0.9, 0.0, 0.0, 0.0),
    ("solo", GENERAL, 0.6, 0.0, 0.0, 0.0),
    ("red_theme", GENERAL, 0.0, 0.7, 0.0, 0.0),
    ("blue_theme", GENERAL, 0.0, 0.0, 0.0, 0.7),
    ("long_hair", GENERAL, 0.4, 0.0, 0.0, 0.0),
    ("^_^", GENERAL, 0.3, 0.2, 0.0, 0.0),
    ("simple_background", GENERAL, 0.2, 0.0, 0.0, 0.0),
    ("red_hero", CHARACTER, 0.0, 0.45, 0.0, 0.0),
    ("kaito_(vocaloid)", CHARACTER, 0.0, 0.8, 0.0, 0.0),
    ("hatsune_miku_(vocaloid)", CHARACTER, 0.0, 0.0, 0.3, 0.6),
)


class MeanColourTagger(torch.nn.Module):
    """NHWC BGR 0-255 images -> per-tag probabilities, a clipped affine function of the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([t[2] for t in TAGS]))
        # rows are the B, G, R input channels (the model sees BGR)
        self.weight = torch.nn.Parameter(
            torch.tensor([[t[5] for t in TAGS], [t[4] for t in TAGS], [t[3] for t in TAGS]])
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bgr = images.mean(dim=(1, 2)) / 255.0
        return torch.clamp(bgr @ self.weight + self.bias, 0.0, 1.0)


def write_tags_csv(path: Path) -> None:
    """``selected_tags.csv`` in SmilingWolf's layout: tag_id,name,category,count."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for n, (name, category, *_weights) in enumerate(TAGS):
            writer.writerow([1000 + n, name, category, 100 - n])


def make_tiny_tagger(folder: Path, size: int = 32, batch: int | None = None) -> Path:
    """Write ``model.onnx`` (input ``input_1``, NHWC ``size``x``size``; a dynamic batch unless ``batch``) and
    ``selected_tags.csv`` into ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model = MeanColourTagger().eval()
    example = torch.zeros(batch or 2, size, size, 3)
    torch.onnx.export(
        model,
        (example,),
        str(folder / "model.onnx"),
        input_names=["input_1"],
        output_names=["predictions_sigmoid"],
        dynamic_axes=None if batch else {"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
        dynamo=False,
    )
    write_tags_csv(folder / "selected_tags.csv")
    return folder
