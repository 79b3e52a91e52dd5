"""``--config_file``: every flag from a TOML file (sections flattened, as sd-scripts does); the command line wins.

Unlike sd-scripts, keys are checked: an unknown key is an error with a did-you-mean suggestion, and values are
converted and checked like command-line values (types, choices). ``--output_config`` writes the effective flags
to the ``--config_file`` path instead of training.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from library.errors import UserError
from library.io import atomic_write_text

NOT_WRITTEN = ("config_file", "output_config", "wandb_api_key", "huggingface_token")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", type=str, default=None, help="read flags from this .toml file")
    parser.add_argument(
        "--output_config", action="store_true", help="write the effective flags to --config_file and exit"
    )


def config_path(value: str) -> Path:
    """sd-scripts adds ``.toml`` when the name has no such suffix."""
    return Path(value if value.endswith(".toml") else value + ".toml")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}


def flatten_sections(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Top-level keys and the keys of each ``[section]`` in one dict; a key set in two places is an error."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        section = f"[{name}]" if isinstance(value, dict) else "the top level"
        for key, item in items:
            if key in flat:
                raise UserError(f"{path}: key '{key}' is set both in {where[key]} and in {section}; keep one")
            flat[key], where[key] = item, section
    return flat


def _convert_one(value: Any, action: argparse.Action, where: str) -> Any:
    kind = action.type
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: expected a single value, got {type(value).__name__} {value!r}")
    if isinstance(value, bool) and kind in (int, float):
        raise UserError(f"{where}: expected a number, got {str(value).lower()}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        if kind is float:
            return float(value)
        if kind is str or kind is None:
            return str(value) if not isinstance(value, str) else value
        return kind(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{where}: invalid value {value!r} ({e})") from None


def convert_value(key: str, value: Any, action: argparse.Action, path: Path) -> Any:
    """Convert a TOML value the way argparse converts the same flag on the command line, then check choices."""
    where = f"{path}: {key}"
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        converted: Any = [_convert_one(v, action, where) for v in items]
        checked = converted
    else:
        converted = _convert_one(value, action, where)
        checked = [converted]
    if action.choices is not None:
        for item in checked:
            if item not in action.choices:
                options = ", ".join(str(c) for c in action.choices if c is not None)
                raise UserError(f"{where}: {item!r} is not one of: {options}")
    return converted


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags set in a config file, converted and checked against ``parser``."""
    if not path.is_file():
        raise UserError(f"--config_file {path}: file not found")
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from e
    actions = _actions(parser)
    values: dict[str, Any] = {}
    for key, value in flatten_sections(data, path).items():
        if key in NOT_WRITTEN[:2]:
            raise UserError(f"{path}: '{key}' cannot be set inside a config file; pass it on the command line")
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{path}: unknown key '{key}'{hint}; remove it or check the flag name")
        values[key] = convert_value(key, value, action, path)
    return values


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace | None:
    """Parse ``argv`` on top of the ``--config_file`` values; None when ``--output_config`` wrote the file."""
    first = parser.parse_args(argv)
    if not getattr(first, "config_file", None):
        if getattr(first, "output_config", False):
            raise UserError("--output_config needs --config_file: the path to write the flags to")
        return first
    path = config_path(first.config_file)
    if first.output_config:
        write_config_file(first, path)
        return None
    values = read_config_file(path, parser)
    return parser.parse_args(argv, namespace=argparse.Namespace(**values))


def config_text(args: argparse.Namespace) -> str:
    """The flags of ``args`` as TOML (None values left out; paths as text)."""
    values: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_WRITTEN or value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        values[key] = value
    return toml.dumps(values)


def write_config_file(args: argparse.Namespace, path: Path) -> None:
    """sd-scripts' ``--output_config``: never overwrites an existing file."""
    if path.exists():
        raise UserError(f"--output_config: {path} already exists; choose another --config_file path or delete it")
    atomic_write_text(path, config_text(args))
