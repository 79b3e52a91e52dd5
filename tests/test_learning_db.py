"""train_db.py learns on the bundled tiny-shapes model: the subject (orange rings captioned ``a sks circle ...``)
is learned, and prior preservation (class images of plain orange circles, ``--prior_loss_weight 1.0``) keeps the
class prompt closer to what the base model drew than the same subject exposures without class images.

Thresholds have margin over the measured figures (see the test's docstring); after a model
change, rerun this file with ``-s`` and read the printed figures. The subject is judged by its hole (the part
of the concept the base never draws): the learned rings come out red-orange and lumpy, so the full concept_score
stays low in a CI-sized run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train_db
from library.models.load import load_model
from library.shapes.scenes import Scene, write_dataset
from tests.shapes_learning import concept_run_args, copy_concept_images, hollow_share, sample

SUBJECT_IMAGES = 8
EPOCHS = 10  # subject exposures per run: 8 images x 10 epochs (with class images the run has twice the steps)
SEEDS = range(6)
SUBJECT_PROMPT = "a sks circle on a gray background"
CLASS_PROMPT = "a orange circle on a white background"
BACKGROUNDS = ("white", "black", "gray", "blue")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])


def train(root: Path, name: str, *extra: str) -> Path:
    """A short DreamBooth run of the UNet (text encoder frozen) on ``root/img``; the saved model's path."""
    out = root / name
    train_db.main(
        [
            *concept_run_args(root / "img"),
            "--stop_text_encoder_training",
            "-1",
            "--learning_rate",
            "1e-3",
            "--optimizer_type",
            "AdamW",
            "--max_train_epochs",
            str(EPOCHS),
            "--seed",
            "1",
            "--output_dir",
            str(out),
            "--output_name",
            "db",
            "--save_model_as",
            "safetensors",
            *extra,
        ]
    )
    return out / "db.safetensors"


@pytest.mark.usefixtures("one_torch_thread")
def test_prior_preservation_learns_the_subject_and_keeps_the_class_prompt(tmp_path):
    """Measured (seed 1): class-prompt pixel drift from the base samples 32.9 without class images, 18.3 with
    them; class samples judged hollow 0/6 either way; subject samples judged hollow 0/6 before training, 4/6 after it
    with prior preservation. With the loss target broken (zeros) this fails."""
    copy_concept_images(tmp_path / "img" / "1_sks circle", SUBJECT_IMAGES)
    class_scenes = [Scene("orange", "circle", BACKGROUNDS[i % 4], 64, 64) for i in range(SUBJECT_IMAGES)]
    write_dataset(tmp_path / "reg" / "1_orange circle", class_scenes, seed=0)

    base = load_model("tiny-shapes")
    base_class = sample(base, CLASS_PROMPT, SEEDS)
    base_subject = sample(base, SUBJECT_PROMPT, SEEDS)
    plain = load_model(train(tmp_path, "plain"))
    prior = load_model(train(tmp_path, "prior", "--reg_data_dir", str(tmp_path / "reg"), "--prior_loss_weight", "1.0"))
    plain_class, prior_class = sample(plain, CLASS_PROMPT, SEEDS), sample(prior, CLASS_PROMPT, SEEDS)
    prior_subject = sample(prior, SUBJECT_PROMPT, SEEDS)

    drift_plain = float(np.abs(pixels(plain_class) - pixels(base_class)).mean())
    drift_prior = float(np.abs(pixels(prior_class) - pixels(base_class)).mean())
    figures = {
        "drift_plain": drift_plain,
        "drift_prior": drift_prior,
        "class_hollow_plain": hollow_share(plain_class),
        "class_hollow_prior": hollow_share(prior_class),
        "subject_hollow_base": hollow_share(base_subject),
        "subject_hollow_prior": hollow_share(prior_subject),
    }
    print(figures)
    assert figures["subject_hollow_base"] <= 1 / 6, figures
    assert figures["subject_hollow_prior"] >= 3 / 6, figures
    assert drift_prior < 0.7 * drift_plain, figures
    assert figures["class_hollow_prior"] <= 1 / 6, figures
