"""The bundled tiny-shapes model: loads by name, loads from a single file made by our converter, loads in diffusers,
and draws what its captions say (the evaluator's scores on held-out captions)."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.load import bundled_model_dir, load_model
from library.models.save import save_model

QUALITY = {"colour": 0.9, "background": 0.9, "shape": 0.7}
"""The issue's targets on held-out captions; the shipped model measures 100% / 100% / 92-94% over 4 seeds."""


@pytest.fixture(scope="module")
def bundled():
    return load_model("tiny-shapes")


def same_weights(a, b) -> bool:
    parts = ("unet", "vae", "text_encoder")
    pairs = [(getattr(a, p).state_dict(), getattr(b, p).state_dict()) for p in parts]
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in pairs)


def test_loads_by_name_as_an_sd1_model_with_the_clip_tokenizer(bundled):
    assert bundled.family.name == "sd1" and not bundled.v_parameterization
    assert bundled.tokenizer.vocab_size == 49408
    assert len(bundled.tokenizer("a red circle on a white background").input_ids) == 9


def test_a_single_file_copy_loads_back_to_the_same_weights(bundled, tmp_path):
    path = save_model(bundled, tmp_path / "tiny-shapes.safetensors", "safetensors")
    assert same_weights(load_model(path), bundled)


def test_diffusers_loads_the_bundled_folder(bundled):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_dir("tiny-shapes")), local_files_only=True)
    assert pipe.unet.config.block_out_channels == bundled.unet.config.block_out_channels
    assert torch.equal(pipe.unet.conv_in.weight, bundled.unet.conv_in.weight.to(pipe.unet.dtype))


def test_a_missing_bundled_model_is_one_line(monkeypatch, tmp_path):
    from importlib import resources

    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    with pytest.raises(UserError, match=r"^tiny-shapes: the bundled model is missing from this install"):
        load_model("tiny-shapes")


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=["square", "landscape"])
def test_it_draws_held_out_captions_right(bundled, size):
    """Every held-out (colour, shape, background) triple, two seeds each, square and in a non-square bucket: the
    evaluator's scores stay at the level docs/tiny_shapes.md reports for the shipped model (measured there over
    more seeds)."""
    from library.shapes.evaluate import score
    from library.shapes.scenes import Scene, held_out_combinations
    from tests.shapes_learning import sample

    scenes = [Scene(c, s, b, *size) for c, s, b in held_out_combinations()]
    images = [image for scene in scenes for image in sample(bundled, scene.caption, (1000, 1001), size)]
    scores = score(images, [scene for scene in scenes for _ in range(2)])
    assert scores["background"] >= QUALITY["background"] and scores["colour"] >= QUALITY["colour"], scores
    assert scores["shape"] >= QUALITY["shape"], scores
