"""--config_file / --output_config: flattened sections, command line wins, strict keys and values, round trip."""

from __future__ import annotations

import argparse

import pytest

from library.config.config_file import add_config_arguments, parse_args_with_config
from library.config.engine_flags import (
    add_network_arguments,
    add_saving_arguments,
    add_tracking_arguments,
    add_training_arguments,
)
from library.config.flags import add_dataset_arguments
from library.errors import UserError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for add in (
        add_training_arguments,
        add_saving_arguments,
        add_tracking_arguments,
        add_network_arguments,
        add_dataset_arguments,
        add_config_arguments,
    ):
        add(parser)
    return parser


CONFIG = """
output_name = "frog"

[training]
max_train_steps = 300
mixed_precision = "bf16"
gradient_checkpointing = true

[network]
network_dim = 8
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=1"]

[dataset]
resolution = 512
"""


def test_sections_are_flattened_and_the_command_line_wins(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG)
    args = parse_args_with_config(make_parser(), ["--config_file", str(path), "--network_dim", "16"])
    assert args.output_name == "frog"
    assert (args.max_train_steps, args.mixed_precision, args.gradient_checkpointing) == (300, "bf16", True)
    assert (args.network_dim, args.network_alpha) == (16, 4.0)
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.resolution == "512"
    assert args.save_model_as == "safetensors" and args.max_train_epochs is None


def test_toml_suffix_is_added_like_sd_scripts(tmp_path):
    (tmp_path / "cfg.toml").write_text("max_train_steps = 5\n")
    args = parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / "cfg")])
    assert args.max_train_steps == 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("[net]\nnetwork_dims = 4\n", "cfg.toml: unknown key 'network_dims' (did you mean 'network_dim'?)"),
        ("max_train_steps = 'many'\n", "cfg.toml: max_train_steps: invalid value 'many'"),
        ("max_train_steps = 2.5\n", "cfg.toml: max_train_steps: invalid value 2.5"),
        ("mixed_precision = 'fp32'\n", "cfg.toml: mixed_precision: 'fp32' is not one of: no, fp16, bf16"),
        ("gradient_checkpointing = 'yes'\n", "cfg.toml: gradient_checkpointing: expected true or false, got 'yes'"),
        ("[a]\nseed = 1\n[b]\nseed = 2\n", "cfg.toml: key 'seed' is set both in [a] and in [b]; keep one"),
        ("max_train_steps = \n", "cfg.toml: not valid TOML"),
    ],
)
def test_bad_config_files_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_args_with_config(make_parser(), ["--config_file", str(path)])
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="--config_file .*nope.toml: file not found"):
        parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / "nope.toml")])


def test_output_config_writes_the_effective_flags_and_reads_back(tmp_path):
    path = tmp_path / "written.toml"
    argv = ["--network_dim", "32", "--network_args", "conv_dim=2", "--resolution", "64,96", "--gradient_checkpointing"]
    assert parse_args_with_config(make_parser(), [*argv, "--config_file", str(path), "--output_config"]) is None
    text = path.read_text()
    assert "network_dim = 32\n" in text and "config_file" not in text and "output_config" not in text
    from_file = parse_args_with_config(make_parser(), ["--config_file", str(path)])
    direct = make_parser().parse_args(argv)
    assert {k: v for k, v in vars(from_file).items() if k != "config_file"} == {
        k: v for k, v in vars(direct).items() if k != "config_file"
    }
    with pytest.raises(UserError, match="already exists"):
        parse_args_with_config(make_parser(), [*argv, "--config_file", str(path), "--output_config"])
