"""Sample prompt files (``--sample_prompts``): ``.txt`` lines with inline options, ``.toml`` and ``.json``.

Parsing gives sd-scripts' prompt dicts (only the keys the file sets, plus ``enum``, the prompt's position);
``resolve_prompt`` fills in sd-scripts' defaults. Unlike sd-scripts, a bad value is an error naming the file and
line (or prompt), not a silently ignored option.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from library.errors import UserError
from library.sampling.samplers import check_sampler_name

logger = logging.getLogger(__name__)

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MIN_SIZE = 64


@dataclass(frozen=True)
class SamplePrompt:
    """One fully resolved sample request; ``index`` is the prompt's position in its file (used in file names)."""

    index: int
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    sample_steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sampler: str = "ddim"


def _int(value: str) -> int:
    if not value.isdigit():
        raise ValueError("a whole number >= 0")
    return int(value)


def _steps(value: str) -> int:
    return max(1, min(1000, _int(value)))


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError("a number") from None


def _text(value: str) -> str:
    return value


# ``--<option> value`` in a .txt line → (dict key, converter); the same set sd-scripts' line_to_prompt_dict reads.
_LINE_OPTIONS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "w": ("width", _int),
    "h": ("height", _int),
    "d": ("seed", _int),
    "s": ("sample_steps", _steps),
    "l": ("scale", _float),
    "g": ("guidance_scale", _float),
    "n": ("negative_prompt", _text),
    "ss": ("sample_sampler", _text),
    "cn": ("controlnet_image", _text),
}

# Keys a .toml / .json prompt may set, with the Python types each accepts.
_KEY_TYPES: Mapping[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "width": (int,),
    "height": (int,),
    "seed": (int,),
    "sample_steps": (int,),
    "scale": (int, float),
    "guidance_scale": (int, float),
    "sample_sampler": (str,),
    "controlnet_image": (str,),
}


def line_to_prompt_dict(line: str, where: str = "prompt") -> dict[str, Any]:
    """Parse ``prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps --ss sampler``.

    Options are split on `` --`` as sd-scripts does; an unknown option is logged and ignored (sd-scripts ignores
    it too), a known option without a valid value raises a UserError naming ``where``.
    """
    prompt, *options = line.strip().split(" --")
    result: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name not in _LINE_OPTIONS:
            logger.warning("%s: unknown option --%s ignored", where, name)
            continue
        key, convert = _LINE_OPTIONS[name]
        if not value:
            raise UserError(f"{where}: option --{name} has no value; write e.g. '--{name} <value>'")
        try:
            result[key] = convert(value)
        except ValueError as e:
            raise UserError(f"{where}: option --{name} {value!r} must be {e}") from None
        if key == "sample_sampler":
            check_sampler_name(value, f"{where}: option --ss")
    return result


def _check_dict(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        return line_to_prompt_dict(item, where)
    if not isinstance(item, dict):
        raise UserError(f"{where}: a prompt must be a table/object or a string, not {type(item).__name__}")
    for key, value in item.items():
        if key not in _KEY_TYPES:
            raise UserError(f"{where}: unknown key {key!r}; valid keys: {', '.join(_KEY_TYPES)}")
        types = _KEY_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise UserError(f"{where}: key {key!r} must be {wanted}, not {value!r}")
    if not isinstance(item.get("prompt"), str):
        raise UserError(f"{where}: missing key 'prompt'")
    if "sample_sampler" in item:
        check_sampler_name(item["sample_sampler"], f"{where}: key 'sample_sampler'")
    return dict(item)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--sample_prompts {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _from_txt(path: Path, text: str) -> list[dict[str, Any]]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(line_to_prompt_dict(stripped, f"{path}:{number}"))
    return prompts


def _from_toml(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid TOML: {e.msg}") from None
    table = data.get("prompt")
    if isinstance(table, list):
        return [_check_dict(item, f"{path}: [[prompt]] #{i + 1}") for i, item in enumerate(table)]
    if isinstance(table, dict) and isinstance(table.get("subset"), list):
        defaults = {k: v for k, v in table.items() if k != "subset"}
        subsets = table["subset"]
        return [_check_dict({**defaults, **s}, f"{path}: [[prompt.subset]] #{i + 1}") for i, s in enumerate(subsets)]
    raise UserError(
        f"{path}: no prompts found; write [[prompt]] tables, or a [prompt] table of defaults with [[prompt.subset]] "
        "tables, each with a 'prompt' key"
    )


def _from_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: must hold a JSON list of prompt objects, not a {type(data).__name__}")
    return [_check_dict(item, f"{path}: item #{i + 1}") for i, item in enumerate(data)]


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read a prompt file into sd-scripts' prompt dicts, each with ``enum`` set to its position."""
    path = Path(path)
    readers = {".txt": _from_txt, ".toml": _from_toml, ".json": _from_json}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"--sample_prompts {path}: unsupported file type; use a .txt, .toml or .json file")
    prompts = reader(path, _read_text(path))
    for index, prompt in enumerate(prompts):
        prompt["enum"] = index
    return prompts


def _round_size(value: int) -> int:
    """sd-scripts' rule: round down to a multiple of 8, at least 64."""
    return max(MIN_SIZE, value - value % 8)


def resolve_prompt(prompt: Mapping[str, Any], default_sampler: str = "ddim") -> SamplePrompt:
    """Fill in sd-scripts' defaults (512x512, 30 steps, CFG 7.5, no seed, ``default_sampler``)."""
    if "controlnet_image" in prompt:
        logger.warning("prompt #%d: --cn (ControlNet image) is not supported and is ignored", prompt.get("enum", 0))
    steps = int(prompt.get("sample_steps", DEFAULT_STEPS))
    if steps < 1:
        raise UserError(f"prompt #{prompt.get('enum', 0)}: sample_steps must be at least 1, not {steps}")
    return SamplePrompt(
        index=int(prompt.get("enum", 0)),
        prompt=str(prompt.get("prompt", "")),
        negative_prompt=prompt.get("negative_prompt"),
        width=_round_size(int(prompt.get("width", DEFAULT_WIDTH))),
        height=_round_size(int(prompt.get("height", DEFAULT_HEIGHT))),
        sample_steps=steps,
        scale=float(prompt.get("scale", prompt.get("guidance_scale", DEFAULT_SCALE))),
        seed=prompt.get("seed"),
        sampler=check_sampler_name(prompt.get("sample_sampler", default_sampler), "--sample_sampler"),
    )
