"""kohya_ss's shipped SD1.5 presets, as the TOML its GUI passes with ``--config_file``, run through our entry scripts.

The TOMLs in tests/data/kohya_ss/ were written by kohya_ss's own GUI code (see that folder's README.md): every
setting its "Print training command" writes, kohya_ss-only keys (``epoch``, ``noise_offset_type``, ...) and
``text_encoder_lr`` lists included; only the paths are placeholders, which the test overrides on the command line.

What sd-scripts (kohya-ss/sd-scripts 48d368fa) does with each, found by running its own argument and dataset code
on these files up to its bucket checks (``NetworkTrainer.assert_extra_args`` / ``fine_tune.train``), and read in
its source after that point:

| preset (file)                        | script        | sd-scripts                                  | here      |
|--------------------------------------|---------------|---------------------------------------------|-----------|
| iA3-Prodigy-sd15                     | train_network | trains (LyCORIS iA3, preset=full, buckets)  | trains    |
| ia3-sd15, loha-sd15, lokr-sd15       | train_network | refuses: bucket_reso_steps = 1, buckets on  | exit 2    |
| sd15 - GLoRA v1.0, LoKR v1.0,        | train_network | refuses: bucket_reso_steps = 1, buckets on  | exit 2    |
|   LoKr v1.1, LoKr v2.0               |               |                                             |           |
| sd15 - EDG_LoraOptiSettings,         | train_network | refuses, only on a type quirk (see below);  | trains    |
|   EDG_LoConOptiSettings,             |               | given an int it trains at 512x650 without   |           |
|   EDG_LoHaOptiSettings               |               | buckets (its UNet passes upsample sizes)    |           |
| adafactor, lion (presets/finetune)   | fine_tune     | refuses: bucket_reso_steps = 1.0, buckets   | exit 2    |
|                                      |               | on (the fine-tune GUI always enables them)  |           |

"exit 2": our one-line ``error:`` naming bucket_reso_steps and the fix (64), exit code 2, nothing saved.

sd-scripts' rule (train_util.BaseDataset.verify_bucket_reso_steps, called with 64 for SD1.x by train_network.py,
train_db.py and fine_tune.py): with buckets on, bucket_reso_steps must be divisible by 64 ("bucket_reso_steps is 1.
it must be divisible by 64", an AssertionError with a traceback). With buckets off the value is not checked.

The type quirk: sd-scripts puts TOML values into its namespace without argparse's conversion, then validates the
dataset options with voluptuous, which wants an int and rejects the GUI's float ``bucket_reso_steps = 64.0``
("expected int for object value @ data['bucket_reso_steps']", after logging "This should be a bug"); the fine-tune
presets' ``1.0`` stops at that check first too. We convert TOML values as the command line would (a whole float
is an int), so the EDG presets, whose buckets are off anyway, are expected to train. For the same reason
sd-scripts never checks the ``dynamo_backend = "no"`` every kohya_ss TOML carries against its choices (it reads
the value only with --torch_compile).

kohya_ss's GUI itself (Gradio 6.17) would refuse some of these presets before running anything: its sliders cap
network/conv dim at 512 (iA3-Prodigy's 1024, the v1.x/v2.0 LoKr presets' 100000) and its caption-extension dropdown
does not offer ia3/loha/lokr-sd15's ".none-use-foldername". The TOMLs keep the presets' own values.

Command-line overrides (the TOMLs' paths are placeholders):
  --pretrained_model_name_or_path tiny-sd1   the tiny SD1 model instead of the user's checkpoint
  --train_data_dir, --output_dir, --logging_dir, --sample_prompts   tmp paths (the GUI writes an empty prompt file)
  --in_json                                  fine_tune.py only: the metadata kohya_ss's GUI first makes with
                                             sd-scripts' finetune/merge_captions_to_metadata.py (written here)
  --max_train_steps 1                        one optimizer step instead of the GUI's computed count
  --resolution 64,81                         the three EDG presets only, for speed (see SMALL_512_650)
  --mixed_precision bf16                     iA3-Prodigy only: its fp16 needs a GPU (accelerate has no fp16
                                             autocast on the CPU, which we refuse in one line)
plus the flags the GUI itself adds after --config_file (LoKr v2.0's "additional parameters").
Nothing else is overridden: optimizer, xformers, buckets, network settings come from the preset.
The images are 64x64. iA3-Prodigy (bucket_no_upscale, min_bucket_reso 256) trains at 256x256 here, where sd-scripts
ignores min/max_bucket_reso under bucket_no_upscale and would train at 64x64 (our library/dataset/buckets.py
enlarges images below min_bucket_reso on purpose).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

import fine_tune
import train_network
from library.cli import run_cli
from tests.training import write_captioned_images

PRESETS = Path(__file__).parent / "data" / "kohya_ss"

TRAINS = "trains"
REFUSES = "refuses"

# Buckets off at the EDG presets' 512x650 take about 25 s a step on 2 CPU cores (attention over 5184 latent
# positions), so those three train at 64x81 instead: still non-square, buckets off, the height no multiple of 8
# (650 = 81.25 x 8) nor of 64.
SMALL_512_650 = ["--resolution", "64,81"]

# file, entry script, expectation, flags kohya_ss adds to the command line after --config_file, overrides for speed
CASES = [
    ("iA3-Prodigy-sd15.toml", "train_network", TRAINS, [], ["--mixed_precision", "bf16"]),
    ("ia3-sd15.toml", "train_network", REFUSES, [], []),
    ("loha-sd15.toml", "train_network", REFUSES, [], []),
    ("lokr-sd15.toml", "train_network", REFUSES, [], []),
    ("sd15-EDG_LoConOptiSettings.toml", "train_network", TRAINS, [], SMALL_512_650),
    ("sd15-EDG_LoHaOptiSettings.toml", "train_network", TRAINS, [], SMALL_512_650),
    ("sd15-EDG_LoraOptiSettings.toml", "train_network", TRAINS, [], SMALL_512_650),
    ("sd15-GLoRA_v1.0.toml", "train_network", REFUSES, [], []),
    ("sd15-LoKR_v1.0.toml", "train_network", REFUSES, [], []),
    ("sd15-LoKr_v1.1.toml", "train_network", REFUSES, [], []),
    (
        "sd15-LoKr_v2.0.toml",
        "train_network",
        REFUSES,
        ["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=1000", "eta_min=0e-0"],
        [],
    ),
    ("adafactor.toml", "fine_tune", REFUSES, [], []),
    ("lion.toml", "fine_tune", REFUSES, [], []),
]

SCRIPTS = {"train_network": train_network, "fine_tune": fine_tune}
IMAGES = 4  # 64x64 captioned images in the tiny dataset


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers]
    return [h for h in handlers if isinstance(h, logging.StreamHandler)]


@pytest.fixture(autouse=True)
def no_logging_to_closed_streams():
    """Log handlers keep the sys.stderr they were made with: run_cli's (made once per process) and LyCORIS's (made
    at its import) are made during some test, under its capsys, whose stream is closed after it. Point any such
    handler back at the stream in place outside the tests' capture, before and after each test, so a later run's
    log lines don't become "--- Logging error --- Traceback ..." on stderr."""
    outer = sys.stderr

    def repoint() -> None:
        for handler in _stream_handlers():
            if getattr(handler.stream, "closed", False):
                handler.stream = outer  # not setStream(): it flushes the closed stream first

    repoint()
    yield
    repoint()


def test_every_preset_file_is_tested():
    assert sorted(p.name for p in PRESETS.glob("*.toml")) == sorted(c[0] for c in CASES)


def preset_argv(tmp_path: Path, name: str, script: str, gui_flags: list[str], overrides: list[str]) -> list[str]:
    """``--config_file <preset>`` plus the overrides listed in the module docstring, on a tiny dataset in
    ``tmp_path``: for train_network.py the DreamBooth folder ``1_sls frog`` of IMAGES 64x64 images with .txt captions;
    for fine_tune.py the same images in one folder with the metadata JSON kohya_ss's GUI would generate."""
    captions = [f"sls frog, number {i}" for i in range(IMAGES)]
    prompts = tmp_path / "out" / "sample" / "prompt.txt"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("")
    if script == "train_network":
        data = tmp_path / "data"
        write_captioned_images(data / "1_sls frog", captions)
        dataset = ["--train_data_dir", str(data)]
    else:
        data = write_captioned_images(tmp_path / "images", captions)
        # merge_captions_to_metadata.py --full_path: image path -> {"caption": ...}
        metadata = {str((data / f"img{i}.png").resolve()): {"caption": c} for i, c in enumerate(captions)}
        in_json = tmp_path / "train_dir" / "meta_cap.json"
        in_json.parent.mkdir()
        in_json.write_text(json.dumps(metadata, indent=2))
        dataset = ["--train_data_dir", str(data), "--in_json", str(in_json)]
    return [
        "--config_file",
        str(PRESETS / name),
        *gui_flags,
        "--pretrained_model_name_or_path",
        "tiny-sd1",
        *dataset,
        "--output_dir",
        str(tmp_path / "out"),
        "--logging_dir",
        str(tmp_path / "logs"),
        "--sample_prompts",
        str(prompts),
        "--max_train_steps",
        "1",
        *overrides,
    ]


@pytest.mark.parametrize(
    "name, script, expected, gui_flags, overrides", CASES, ids=[c[0].removesuffix(".toml") for c in CASES]
)
def test_kohya_ss_preset(tmp_path, capsys, name, script, expected, gui_flags, overrides):
    code = run_cli(SCRIPTS[script].main, preset_argv(tmp_path, name, script, gui_flags, overrides))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if expected == TRAINS:
        assert code == 0, err[-3000:]
        # output_name = "last" in every preset (the GUI's default name)
        assert (tmp_path / "out" / "last.safetensors").is_file(), err[-3000:]
    else:
        assert code == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        # the key and the fix (sd-scripts wants a multiple of 64 for SD 1.x)
        assert last.startswith("error: ") and "bucket_reso_steps" in last and "64" in last, last
        assert not (tmp_path / "out" / "last.safetensors").exists()
