"""fine_tune.py learns a new colour word: tiny-shapes has never read "crimson"; a short fine-tune on red shapes
captioned ``a crimson {shape} on a {background} background`` (one combination left out) makes it draw red for the
word, also for the combination it never saw, while an ordinary caption is still drawn right.

The new word names a palette colour on purpose: the bundled VAE only reconstructs the colours it was trained on
(a pink square comes back orange, cyan comes back blue), so a colour outside the palette cannot be learned by the
UNet and text encoder at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import fine_tune
from library.models.load import load_model
from library.shapes import scenes as shapes
from library.shapes.evaluate import judge
from tests.shapes_learning import sample

WORD = "crimson"
MEANS = "red"
LEFT_OUT = ("circle", "white")
PROBES = ("a crimson circle on a white background", "a crimson star on a gray background")
CONTROL = ("green", "square", "black")
SEEDS = (1, 2, 3, 4)
STEPS = 150


def write_data(folder: Path) -> Path:
    """Red shapes captioned with the new word (every shape and background but ``LEFT_OUT``, twice) and as many
    ordinary scenes with their own captions; the fine-tuning metadata file."""
    folder.mkdir(parents=True)
    metadata = {}
    pairs = [(s, b) for s in shapes.SHAPES for b in shapes.BACKGROUNDS if (s, b) != LEFT_OUT]
    for index, (shape, background) in enumerate(pairs * 2):
        shapes.render(shapes.Scene(MEANS, shape, background, 64, 64), 100 + index).save(folder / f"w{index:03d}.png")
        metadata[f"w{index:03d}"] = {"caption": f"a {WORD} {shape} on a {background} background"}
    ordinary = shapes.random_scenes(len(metadata), 3, sizes=[(64, 64)], exclude=shapes.held_out_combinations())
    for index, scene in enumerate(ordinary):
        shapes.render(scene, 500 + index).save(folder / f"g{index:03d}.png")
        metadata[f"g{index:03d}"] = {"caption": scene.caption}
    meta = folder.parent / "meta.json"
    meta.write_text(json.dumps(metadata), encoding="utf-8")
    return meta


def colours(components) -> tuple[list[str | None], int]:
    """The judged colour of every probe sample, and how many control samples are judged right."""
    probes = [judge(image).colour for prompt in PROBES for image in sample(components, prompt, SEEDS)]
    control = sample(components, "a {} {} on a {} background".format(*CONTROL), SEEDS)
    right = sum((v.colour, v.shape, v.background) == CONTROL for v in map(judge, control))
    return probes, right


def test_fine_tune_teaches_a_new_colour_word(tmp_path, one_torch_thread):
    meta = write_data(tmp_path / "img")
    before, control_before = colours(load_model("tiny-shapes"))
    fine_tune.main(
        [
            *("--pretrained_model_name_or_path", "tiny-shapes", "--train_data_dir", str(tmp_path / "img")),
            *("--in_json", str(meta), "--resolution", "64", "--train_batch_size", "4"),
            *("--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--train_text_encoder"),
            *("--learning_rate_te", "5e-4", "--max_train_steps", str(STEPS), "--seed", "1"),
            *("--max_data_loader_n_workers", "0", "--output_dir", str(tmp_path / "out"), "--output_name", "ft"),
            *("--save_model_as", "diffusers"),
        ]
    )
    after, control_after = colours(load_model(tmp_path / "out" / "ft"))
    print({"before": before, "after": after, "control_right": (control_before, control_after)})  # docs/testing.md
    assert before.count(MEANS) <= 2, before  # the base has no idea what the word means
    assert after.count(MEANS) >= len(after) - 1, after  # red, also for the left-out combination
    assert control_after >= control_before - 1, (control_before, control_after)
