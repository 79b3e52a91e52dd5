"""Every numeric flag has a checked range: out-of-range, NaN and infinite values are one-line errors naming the flag,
on the command line and in --config_file TOML alike, and the values sd-scripts users rely on still parse."""

from __future__ import annotations

import argparse
import importlib

import pytest

from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.values import DATASET_RANGES, Range
from library.errors import UserError

SCRIPTS = ["train_network", "train_db", "fine_tune", "train_textual_inversion", "train_textual_inversion_XTI"]


def parser_of(script: str) -> argparse.ArgumentParser:
    """The real entry script's parser (XTI shares train_textual_inversion's)."""
    name = "train_textual_inversion" if script == "train_textual_inversion_XTI" else script
    return importlib.import_module(name).setup_parser()


# (flag, refused value, the rule named in the error) — flags every script has
REFUSED = [
    ("caption_dropout_rate", "2", "a number from 0 to 1"),
    ("caption_dropout_rate", "nan", "a number from 0 to 1"),
    ("caption_dropout_rate", "-0.1", "a number from 0 to 1"),
    ("caption_tag_dropout_rate", "-1", "a number from 0 to 1"),
    ("keep_tokens", "-1", "a whole number of at least 0"),
    ("keep_tokens", "1.5", "a whole number of at least 0"),
    ("caption_dropout_every_n_epochs", "-1", "a whole number of at least 0"),
    ("token_warmup_min", "-5", "a whole number of at least 0"),
    ("token_warmup_step", "inf", "a number of at least 0"),
    ("learning_rate", "nan", "a number of at least 0"),
    ("learning_rate", "-0.0001", "a number of at least 0"),
    ("learning_rate", "infinity", "a number of at least 0"),
    ("seed", "-1", "a whole number from 0 to 4294967295"),
    ("seed", "4294967296", "a whole number from 0 to 4294967295"),
    ("initial_step", "-1", "a whole number of at least 0"),
    ("initial_epoch", "0", "a whole number of at least 1"),
    ("train_batch_size", "0", "a whole number from 1 to 1000000"),
    ("dataset_repeats", "0", "a number above 0 and at most 1000000"),
    ("lr_scheduler_power", "nan", "a number of at least 0"),
    ("lr_scheduler_num_cycles", "0", "a whole number of at least 1"),
    ("lr_scheduler_min_lr_ratio", "1.5", "a number from 0 to 1"),
    ("lr_scheduler_timescale", "0", "a whole number of at least 1"),
    ("max_train_steps", "0", "a whole number of at least 1"),
    ("max_train_epochs", "-3", "a whole number of at least 1"),
    ("gradient_accumulation_steps", "0", "a whole number of at least 1"),
    ("max_grad_norm", "-1", "a number of at least 0"),
    ("noise_offset", "-0.1", "a number of at least 0"),
    ("adaptive_noise_scale", "nan", "a number (not NaN or infinity)"),
    ("multires_noise_iterations", "-1", "a whole number of at least 0"),
    ("multires_noise_discount", "1.5", "a number from 0 to 1"),
    ("ip_noise_gamma", "-0.1", "a number of at least 0"),
    ("min_timestep", "1000", "a whole number from 0 to 999"),
    ("max_timestep", "0", "a whole number from 1 to 1000"),
    ("min_snr_gamma", "0", "a number above 0"),
    ("huber_c", "0", "a number above 0"),
    ("huber_scale", "-1", "a number above 0"),
    ("v_pred_like_loss", "-1", "a number of at least 0"),
    ("clip_skip", "0", "a whole number of at least 1"),
    ("vae_batch_size", "0", "a whole number of at least 1"),
    ("min_bucket_reso", "0", "a whole number of at least 1"),
    ("bucket_reso_steps", "-64", "a whole number of at least 1"),
    ("prior_loss_weight", "-1", "a number of at least 0"),
    ("max_data_loader_n_workers", "-1", "a whole number of at least 0"),
    ("validation_split", "1", "a number of at least 0 and below 1"),
    ("validation_seed", "-2", "a whole number from 0 to 4294967295"),
    ("save_every_n_epochs", "0", "a whole number of at least 1"),
    ("save_every_n_steps", "-5", "a whole number of at least 1"),
    ("save_n_epoch_ratio", "0", "a whole number of at least 1"),
    ("save_last_n_epochs", "0", "a whole number of at least 1"),
    ("save_last_n_steps_state", "0", "a whole number of at least 1"),
    ("sample_every_n_steps", "0", "a whole number of at least 1"),
    ("sample_every_n_epochs", "nan", "a whole number of at least 1"),
]
NETWORK_REFUSED = [
    ("network_dim", "-4", "a whole number of at least 1"),
    ("network_dropout", "2", "a number of at least 0 and below 1"),
    ("network_alpha", "nan", "a number of at least 0"),
    ("unet_lr", "-1", "a number of at least 0"),
    ("text_encoder_lr", "nan", "a number of at least 0"),
    ("scale_weight_norms", "-1", "a number of at least 0"),
    ("base_weights_multiplier", "inf", "a number (not NaN or infinity)"),
    ("max_validation_steps", "0", "a whole number of at least 1"),
]
CASES = [(s, *c) for s in SCRIPTS for c in REFUSED]
CASES += [("train_network", *c) for c in NETWORK_REFUSED]
CASES += [(s, "learning_rate_te", "nan", "a number of at least 0") for s in ("train_db", "fine_tune")]
CASES += [(s, "num_vectors_per_token", "0", "a whole number from 1 to 75") for s in SCRIPTS[3:]]


@pytest.mark.parametrize("script, flag, value, rule", CASES)
def test_out_of_range_values_are_refused_by_the_entry_parser(script, flag, value, rule):
    with pytest.raises(UserError) as info:
        parser_of(script).parse_args([f"--{flag}", value])
    message = str(info.value)
    assert f"argument --{flag}: must be {rule}, got '{value}'" in message
    assert "\n" not in message


@pytest.mark.parametrize("script, flag, value, rule", [c for c in CASES if c[0] in ("train_network", "fine_tune")])
def test_run_cli_exits_2_with_one_line_naming_the_flag(script, flag, value, rule, capsys):
    main = importlib.import_module(script).main
    assert run_cli(main, [f"--{flag}", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"argument --{flag}: must be {rule}, got '{value}'" in err


def test_xti_run_cli_refuses_a_negative_seed(capsys):
    import train_textual_inversion_XTI

    assert run_cli(train_textual_inversion_XTI.main, ["--seed", "-1"]) == 2
    assert "argument --seed: must be a whole number from 0 to 4294967295, got '-1'" in capsys.readouterr().err


# Values sd-scripts users legitimately pass: they must keep parsing, to these exact values.
ACCEPTED = [
    ("max_grad_norm", "0", 0.0),
    ("learning_rate", "0", 0.0),
    ("learning_rate", "1e-4", 1e-4),
    ("noise_offset", "0", 0.0),
    ("noise_offset", "0.0357", 0.0357),
    ("adaptive_noise_scale", "-0.5", -0.5),
    ("min_snr_gamma", "5", 5.0),
    ("seed", "0", 0),
    ("seed", "4294967295", 4294967295),
    ("keep_tokens", "0", 0),
    ("caption_dropout_rate", "1", 1.0),
    ("train_batch_size", "4", 4),
    ("dataset_repeats", "10", 10.0),
    ("min_timestep", "0", 0),
    ("max_timestep", "1000", 1000),
    ("lr_scheduler_power", "0", 0.0),
    ("lr_warmup_steps", "0.1", 0.1),
    ("lr_warmup_steps", "10%", 0.1),
    ("lr_warmup_steps", "250", 250),
    ("multires_noise_iterations", "0", 0),
    ("initial_step", "0", 0),
    ("max_data_loader_n_workers", "0", 0),
    ("token_warmup_step", "0.5", 0.5),
]


@pytest.mark.parametrize("flag, value, expected", ACCEPTED)
def test_values_sd_scripts_users_use_still_parse(flag, value, expected):
    got = getattr(parser_of("train_network").parse_args([f"--{flag}", value]), flag)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "flag, value, expected",
    [("network_dropout", "0", 0.0), ("network_alpha", "0", 0.0), ("scale_weight_norms", "0", 0.0)],
)
def test_network_values_that_mean_off_still_parse(flag, value, expected):
    assert getattr(parser_of("train_network").parse_args([f"--{flag}", value]), flag) == expected


@pytest.mark.parametrize("value", ["nan%", "150%", "-5%", "inf", "-1"])
def test_warmup_steps_refuse_nan_and_out_of_range_percentages(value):
    with pytest.raises(UserError, match=r"argument --lr_warmup_steps: "):
        parser_of("train_network").parse_args(["--lr_warmup_steps", value])


def test_dataset_flags_share_the_dataset_key_ranges():
    """A flag that is also a dataset TOML key uses the very same Range, so the two can never disagree."""
    actions = {a.dest: a for a in parser_of("train_network")._actions}
    for key, flag in [("keep_tokens", "keep_tokens"), ("batch_size", "train_batch_size"), ("num_repeats", None)]:
        if flag is not None:
            assert actions[flag].type.range is DATASET_RANGES[key]
    assert Range(int, 0, 2**32 - 1).describe() == "a whole number from 0 to 4294967295"


CONFIG_REFUSED = [
    ("caption_dropout_rate = 2.0", "caption_dropout_rate must be a number from 0 to 1, got 2.0"),
    ("caption_dropout_rate = nan", "caption_dropout_rate must be a number from 0 to 1, got nan"),
    ("seed = -1", "seed must be a whole number from 0 to 4294967295, got -1"),
    ("seed = 4294967296", "seed must be a whole number from 0 to 4294967295, got 4294967296"),
    ("learning_rate = inf", "learning_rate must be a number of at least 0, got inf"),
    ("network_dim = -4", "network_dim must be a whole number of at least 1, got -4"),
    ("network_dropout = 2", "network_dropout must be a number of at least 0 and below 1, got 2"),
    ("train_batch_size = 0", "train_batch_size must be a whole number from 1 to 1000000, got 0"),
    ("train_batch_size = true", "train_batch_size must be a whole number from 1 to 1000000, got True"),
    ("keep_tokens = 'two'", "keep_tokens must be a whole number of at least 0, got 'two'"),
    ("text_encoder_lr = [1e-4, nan]", "text_encoder_lr must be a number of at least 0, got nan"),
    ("lr_scheduler_power = nan", "lr_scheduler_power must be a number of at least 0, got nan"),
]


@pytest.mark.parametrize("line, message", CONFIG_REFUSED)
def test_config_file_values_get_the_same_checks_naming_file_and_key(tmp_path, line, message):
    path = tmp_path / "cfg.toml"
    path.write_text(f"[training]\n{line}\n")
    with pytest.raises(UserError) as info:
        parse_args_with_config(parser_of("train_network"), ["--config_file", str(path)])
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_config_file_numbers_convert_like_the_command_line(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(
        "seed = 42\nlearning_rate = 1\ncaption_dropout_rate = 0\nmax_train_steps = 10.0\nkeep_tokens = '3'\n"
    )
    args = parse_args_with_config(parser_of("train_network"), ["--config_file", str(path)])
    assert (args.seed, args.learning_rate, args.caption_dropout_rate, args.max_train_steps) == (42, 1.0, 0.0, 10)
    assert type(args.learning_rate) is float and type(args.max_train_steps) is int and args.keep_tokens == 3
