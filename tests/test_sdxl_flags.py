"""Every flag sd-scripts' SDXL training scripts accept is accepted by ours, with values of sd-scripts' shape.

The expected sets are built from tests/data/sd_scripts_flags.json (the SD 1.x/2.x scripts' parsers, sd-scripts commit
48d368fa) plus what the SDXL scripts of that commit change:

- ``sdxl_train_network.py`` is ``train_network.setup_parser()`` plus ``sdxl_train_util.add_sdxl_training_arguments``
  (the two text-encoder caching flags and ``--disable_mmap_load_safetensors``);
- ``sdxl_train_textual_inversion.py`` is ``train_textual_inversion.setup_parser()`` plus the same call with
  ``support_text_encoder_caching=False`` (``--disable_mmap_load_safetensors`` only);
- ``sdxl_train.py`` builds its own parser from fine_tune.py's groups, with train_db.py's DreamBooth dataset flags
  (``add_dataset_arguments(parser, True, True, True)``) and masked-loss flags, but ``add_training_arguments(parser,
  False)`` (no ``--prior_loss_weight``) and neither script's own flags (``--learning_rate_te``,
  ``--no_token_padding``, ``--stop_text_encoder_training``); it adds ``--learning_rate_te1/2``, ``--block_lr``,
  ``--fused_optimizer_groups`` and the flags of ``add_sdxl_training_arguments``.
"""

from __future__ import annotations

import importlib

import pytest

from tests.test_sd_scripts_flags import FLAGS, sample

SDXL_TRAINING = {"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "disable_mmap_load_safetensors"}
NOT_IN_SDXL_TRAIN = {"learning_rate_te", "no_token_padding", "prior_loss_weight", "stop_text_encoder_training"}
SDXL_TRAIN_OWN = {"learning_rate_te1", "learning_rate_te2", "block_lr", "fused_optimizer_groups", "train_text_encoder"}
SDXL_TRAIN_OWN |= {"diffusers_xformers", "no_half_vae"}


def sd_scripts_sdxl_flags() -> dict[str, set[str]]:
    """The flag names of sd-scripts' three SDXL scripts, from the SD scripts' sets and the changes listed above."""
    fine_tune, train_db = set(FLAGS["fine_tune"]), set(FLAGS["train_db"])
    return {
        "sdxl_train_network": set(FLAGS["train_network"]) | SDXL_TRAINING,
        "sdxl_train_textual_inversion": set(FLAGS["train_textual_inversion"]) | {"disable_mmap_load_safetensors"},
        "sdxl_train": (fine_tune | train_db) - NOT_IN_SDXL_TRAIN | SDXL_TRAIN_OWN | SDXL_TRAINING,
    }


EXPECTED = sd_scripts_sdxl_flags()


def our_flags(script: str) -> set[str]:
    parser = importlib.import_module(script).setup_parser()
    return {option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")}


def test_the_expected_sets_have_sd_scripts_sizes():
    """sd-scripts' parsers at 48d368fa define 196, 170 and 176 flags (``--help`` not counted)."""
    sizes = {script: len(flags) for script, flags in EXPECTED.items()}
    assert sizes == {"sdxl_train_network": 196, "sdxl_train_textual_inversion": 170, "sdxl_train": 176}
    assert "reg_data_dir" in EXPECTED["sdxl_train"] and "in_json" in EXPECTED["sdxl_train"]
    assert "masked_loss" in EXPECTED["sdxl_train"]


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_every_sd_scripts_sdxl_flag_is_accepted(script):
    assert sorted(EXPECTED[script] - our_flags(script)) == []


@pytest.mark.parametrize(
    "script, base", [("sdxl_train_network", ["train_network"]), ("sdxl_train", ["fine_tune", "train_db"])]
)
def test_values_of_sd_scripts_shape_parse(script, base):
    """The flags the SDXL scripts share with an SD script take the same values (store_true, lists, types)."""
    parser = importlib.import_module(script).setup_parser()
    specs = {name: spec for b in base for name, spec in FLAGS[b].items() if name in EXPECTED[script]}
    wrong = {}
    for name, spec in specs.items():
        words, expected = sample(name, spec)
        got = getattr(parser.parse_args([f"--{name}", *words]), name)
        if name == "text_encoder_lr":
            expected = 0.0001  # sd-scripts' networks.lora takes the list's first value for both SDXL encoders
        if got != expected:
            wrong[name] = (words, got)
    assert wrong == {}


def test_sdxl_own_values_parse():
    parser = importlib.import_module("sdxl_train").setup_parser()
    args = parser.parse_args(
        ["--learning_rate_te1", "1e-5", "--learning_rate_te2", "0", "--block_lr", ",".join(["1e-4"] * 23)]
    )
    assert (args.learning_rate_te1, args.learning_rate_te2, args.block_lr) == (1e-5, 0.0, ",".join(["1e-4"] * 23))
    flags = ["--cache_text_encoder_outputs_to_disk", "--disable_mmap_load_safetensors", "--fused_optimizer_groups", "2"]
    args = parser.parse_args(flags)
    assert args.cache_text_encoder_outputs_to_disk and args.disable_mmap_load_safetensors
    assert args.fused_optimizer_groups == 2 and not args.cache_text_encoder_outputs


def test_fp16_without_no_half_vae_is_warned_for_sdxl_only():
    from library.engine.launch import half_vae_note
    from library.models.family import family_named

    sdxl, sd1 = family_named("sdxl"), family_named("sd1")
    assert half_vae_note(sdxl, "fp16", False).startswith("--mixed_precision fp16 without --no_half_vae: the SDXL VAE")
    quiet = [half_vae_note(sdxl, "fp16", True), half_vae_note(sdxl, "bf16", False), half_vae_note(sd1, "fp16", False)]
    assert quiet == [None, None, None]
