"""train_network.py learns: a short LoRA run on the example concept (orange rings, ``sks``) makes the bundled
tiny-shapes model draw rings for the trigger prompt, judged by the tiny-shapes evaluator, while a control prompt's
samples change little.

The base is sampled before training and again with the trained LoRA file hooked onto the same components (how
gen_img.py applies it), with the same seeds, so the only difference is the LoRA. docs/testing.md explains the
thresholds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import train_network
from library.generate.networks import NetworkFile, applied
from library.models.components import Components
from library.models.load import load_model
from library.shapes.concept import RING, concept_score, mean_change, shows
from library.shapes.evaluate import judge
from tests.shapes_learning import copy_concept_images, hollow_share, sample

MODEL = "tiny-shapes"
REG_FOLDER = Path(__file__).resolve().parents[1] / "examples" / "dataset" / "reg" / "1_shape"
TRIGGER_BACKGROUNDS = ("white", "gray", "black")
TRIGGER_SEEDS = (1, 2)
CONTROL = ("green", "square", "black")
CONTROL_SEEDS = (1, 2, 3, 4)
STEPS = 200
LEARNING_RATE = "4e-3"

MIN_HOLLOW_GAIN = 0.5
"""The share of trigger samples judged hollow (the concept's hole, which the base never draws) must rise by this."""
MIN_CONCEPT_GAIN = 1 / 3
"""The share judged the whole concept (orange and hollow) must rise by this (measured: 0 -> 3/6)."""
MAX_CONTROL_CHANGE = 12.0
"""The control samples' mean absolute pixel change (0-255) must stay under this."""
CONTROL_SLACK = 1
"""The control samples judged right may drop by at most this many images."""


def samples(components: Components) -> tuple[list[Image.Image], list[Image.Image]]:
    """Trigger-prompt samples (every background, every seed) and control-prompt samples."""
    trigger = [
        image
        for background in TRIGGER_BACKGROUNDS
        for image in sample(components, RING.caption(background), TRIGGER_SEEDS)
    ]
    control = sample(components, "a {} {} on a {} background".format(*CONTROL), CONTROL_SEEDS)
    return trigger, control


def judged_right(images: list[Image.Image]) -> int:
    """How many control images the evaluator reads as the control prompt's solid shape."""
    return sum(shows(judge(image), CONTROL) for image in images)


def paired_change(before: list[Image.Image], after: list[Image.Image]) -> float:
    """Mean absolute pixel difference (0-255) over paired images."""
    return float(np.mean([mean_change(a, b) for a, b in zip(before, after, strict=True)]))


def train_lora(root: Path) -> Path:
    """README's example recipe: a rank-8 LoRA on UNet and text encoder trained on the 20 concept images (20
    repeats) with the example's 20 regularization images, bucketed at tiny-shapes' 64 px area budget; its file."""
    copy_concept_images(root / "data" / "20_sks circle")
    shutil.copytree(REG_FOLDER, root / "reg" / REG_FOLDER.name)
    out = root / "out"
    data = ["--train_data_dir", str(root / "data"), "--reg_data_dir", str(root / "reg"), "--caption_extension", ".txt"]
    data += ["--train_batch_size", "4", "--lr_scheduler", "cosine"]
    buckets = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    network = ["--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8"]
    optimizer = ["--optimizer_type", "AdamW", "--learning_rate", LEARNING_RATE, "--max_train_steps", str(STEPS)]
    rest = ["--bucket_reso_steps", "16", "--cache_latents", "--seed", "42"]
    outputs = ["--max_data_loader_n_workers", "0", "--output_dir", str(out), "--output_name", "lora"]
    train_network.main(
        ["--pretrained_model_name_or_path", MODEL, *data, *buckets, *network, *optimizer, *rest, *outputs]
    )
    return out / "lora.safetensors"


def test_lora_learns_the_concept_and_leaves_the_control_prompt_alone(tmp_path, one_torch_thread):
    components = load_model(MODEL)
    trigger_before, control_before = samples(components)
    lora = train_lora(tmp_path)
    cpu = torch.device("cpu")
    with applied(components, [NetworkFile(str(lora))], merge=False, device=cpu, dtype=torch.float32):
        trigger_after, control_after = samples(components)
    before, after = hollow_share(trigger_before), hollow_share(trigger_after)
    print(  # the figures docs/testing.md reports (run with -s)
        {
            "hollow": (before, after),
            "concept": (concept_score(trigger_before), concept_score(trigger_after)),
            "control_right": (judged_right(control_before), judged_right(control_after)),
            "control_change": paired_change(control_before, control_after),
        }
    )
    assert after >= before + MIN_HOLLOW_GAIN, f"hollow trigger samples {before:.2f} -> {after:.2f}"
    concept_before, concept_after = concept_score(trigger_before), concept_score(trigger_after)
    gained = concept_after >= concept_before + MIN_CONCEPT_GAIN - 1e-9
    assert gained, f"concept score {concept_before:.2f} -> {concept_after:.2f}"
    change = paired_change(control_before, control_after)
    assert change < MAX_CONTROL_CHANGE, f"control samples changed by {change:.1f} / 255"
    assert judged_right(control_after) >= judged_right(control_before) - CONTROL_SLACK
