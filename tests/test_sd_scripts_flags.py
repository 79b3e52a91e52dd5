"""Every flag sd-scripts' SD 1.x/2.x training scripts accept is accepted here, with values of sd-scripts' shape.

tests/data/sd_scripts_flags.json was made from each sd-scripts script's own setup_parser() (commit 48d368fa): for
every flag its type, nargs, store_true, choices and default.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from library.config.config_file import parse_args_with_config

FLAGS: dict[str, dict[str, dict[str, Any]]] = json.loads(
    (Path(__file__).parent / "data" / "sd_scripts_flags.json").read_text(encoding="utf-8")
)["scripts"]
STRING_VALUES = {"metadata_thumbnail": "data:image/png;base64,AAAA", "resolution": "512,768"}
STRING_VALUES["face_crop_aug_range"] = "2.0,4.0"


def parser_of(script: str) -> argparse.ArgumentParser:
    """The real entry script's parser (XTI shares train_textual_inversion's)."""
    name = "train_textual_inversion" if script == "train_textual_inversion_XTI" else script
    return importlib.import_module(name).setup_parser()


def sample(name: str, spec: dict[str, Any]) -> tuple[list[str], Any]:
    """A valid sd-scripts command-line value for a flag, and what it must parse to here."""
    if spec["store_true"]:
        return [], True
    kind, default = spec["type"], spec["default"]
    if spec["choices"]:
        choice = [c for c in spec["choices"] if c is not None][-1]
        return [str(choice)], choice
    if spec["nargs"] == "*":
        if kind == "float":
            return ["0.0001", "0.0001"], [0.0001, 0.0001]
        return ["a=1", "b=2"], ["a=1", "b=2"]
    if kind == "int":
        value = default if isinstance(default, int) and not isinstance(default, bool) else 1
        return [str(value)], value
    if kind == "float":
        value = float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else 0.5
        return [str(value)], value
    if kind == "int_or_float":
        return ["10"], 10
    value = STRING_VALUES.get(name, "data.toml" if kind == "Path" else "some text")
    return [value], value


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_every_sd_scripts_flag_is_accepted(script):
    ours = {option for action in parser_of(script)._actions for option in action.option_strings}
    missing = sorted(name for name in FLAGS[script] if f"--{name}" not in ours)
    assert missing == []


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_values_of_sd_scripts_shape_parse(script):
    """store_true flags take no value, nargs='*' flags take lists (and nothing), typed flags their type's values."""
    parser = parser_of(script)
    known = {a.dest for a in parser._actions}
    wrong = {}
    for name, spec in FLAGS[script].items():
        if name not in known:
            continue  # reported by test_every_sd_scripts_flag_is_accepted
        words, expected = sample(name, spec)
        got = getattr(parser.parse_args([f"--{name}", *words]), name)
        if name == "text_encoder_lr":
            expected = 0.0001  # sd-scripts' one-per-encoder list collapses: every text encoder trains at one rate
        if got != expected:
            wrong[name] = (words, got)
        if spec["nargs"] == "*" and getattr(parser.parse_args([f"--{name}"]), name) not in ([], None):
            wrong[name] = ([], "a flag of nargs='*' must take no values")
    assert wrong == {}


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_the_same_values_parse_from_a_config_file(script, tmp_path, monkeypatch):
    """One TOML file holding a value of sd-scripts' type for every flag parses to the same values."""
    import toml

    from library.cli import close_log_files

    monkeypatch.chdir(tmp_path)  # --console_log_file "some text" is created here

    parser = parser_of(script)
    known = {a.dest for a in parser._actions}
    values, expected = {}, {}
    for name, spec in FLAGS[script].items():
        if name not in known or name in ("config_file", "output_config"):
            continue  # those two are command-line only
        values[name] = sample(name, spec)[1]
        expected[name] = 0.0001 if name == "text_encoder_lr" else values[name]
    path = tmp_path / "all.toml"
    path.write_text(toml.dumps(values))
    try:
        args = parse_args_with_config(parser, ["--config_file", str(path)])
    finally:
        close_log_files()
    assert {name: getattr(args, name) for name in expected} == expected
    assert (tmp_path / "some text").is_file()


def test_a_kohya_ss_config_with_the_runtime_flags_it_writes_parses(tmp_path):
    """kohya_ss writes dynamo_backend (an sd-scripts flag) into every config; with the runtime flags it parses."""
    path = tmp_path / "config_lora.toml"
    path.write_text('dynamo_backend = "no"\nepoch = 4\nnoise_offset_type = "Original"\nhighvram = true\n')
    args = parse_args_with_config(parser_of("train_network"), ["--config_file", str(path)])
    assert (args.dynamo_backend, args.highvram) == ("no", True) and not hasattr(args, "epoch")
