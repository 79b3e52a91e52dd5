"""Sample prompt files (``--sample_prompts``): ``.txt`` lines with inline options, ``.toml`` and ``.json``.

Parsing gives sd-scripts' prompt dicts (only the keys the file sets, plus ``enum``, the prompt's position);
``resolve_prompt`` fills in sd-scripts' defaults. Unlike sd-scripts, a bad value is an error naming the file and
line (or prompt), not a silently ignored option: sizes must be 1 to 4096 pixels (then rounded down to a multiple
of 8, at least 64, as sd-scripts does), seeds 0 to 2**64-1 (what ``torch.Generator.manual_seed`` takes), steps 1 to
1000 (a ``.txt`` ``--s`` is clamped to that range, as in sd-scripts), scales finite and >= 0.
"""

from __future__ import annotations

import json
import logging
import math
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
MAX_SIZE = 4096  # pixels per side; 4096 px is a 512x512 latent, far above what SD 1.x/2.x were trained on
MAX_STEPS = 1000  # sd-scripts clamps --s to 1..1000
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed accepts
ECHO_LIMIT = 80  # characters of a user's value repeated in a message


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


def one_line(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` with its whitespace runs (newlines included) made single spaces, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(value: object, limit: int = ECHO_LIMIT) -> str:
    """A user's value for a message: ``repr`` for strings, ``str`` otherwise, on one line, at most ``limit`` long."""
    return one_line(repr(value) if isinstance(value, str) else str(value), limit)


def _int(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError("a whole number >= 0")
    return int(value)


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
    "s": ("sample_steps", _int),
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


def _check_value(key: str, value: Any, where: str, notes: list[str] | None, *, clamp_steps: bool = False) -> Any:
    """``value`` for ``key`` checked against the limits in the module docstring (``where`` names the file, the
    line or entry, and the option); returns it, clamped where sd-scripts clamps. Adjustments that sd-scripts makes
    silently (clamped steps, sizes rounded to a multiple of 8) are added to ``notes`` when it is given."""
    shown = shorten(value)
    if key in ("width", "height"):
        if not 1 <= value <= MAX_SIZE:
            raise UserError(f"{where} {shown}: a {key} must be 1 to {MAX_SIZE} pixels, e.g. 512")
        rounded = max(MIN_SIZE, value - value % 8)
        if rounded != value and notes is not None:
            notes.append(f"{where} {value}: sampled at {rounded} (a multiple of 8, at least {MIN_SIZE}, as sd-scripts)")
    elif key == "seed":
        if not 0 <= value <= MAX_SEED:
            raise UserError(f"{where} {shown}: a seed must be 0 to {MAX_SEED} (2**64-1), e.g. 42")
    elif key == "sample_steps":
        if clamp_steps and not 1 <= value <= MAX_STEPS:
            clamped = max(1, min(MAX_STEPS, value))
            if notes is not None:
                notes.append(
                    f"{where} {shown}: sampled with {clamped} steps (clamped to 1..{MAX_STEPS}, as sd-scripts)"
                )
            return clamped
        if not 1 <= value <= MAX_STEPS:
            raise UserError(f"{where} {shown}: sample steps must be 1 to {MAX_STEPS}")
    elif key in ("scale", "guidance_scale"):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{where} {shown}: a guidance scale must be a finite number >= 0, e.g. 7.5")
    return value


def line_to_prompt_dict(line: str, where: str = "prompt", notes: list[str] | None = None) -> dict[str, Any]:
    """Parse ``prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps --ss sampler``.

    Options are split on `` --`` as sd-scripts does; an unknown option is logged and ignored (sd-scripts ignores
    it too), a known option without a valid value, or one out of range, raises a UserError naming ``where``.
    ``--s`` is clamped to 1..1000 as in sd-scripts; ``notes`` (when given) collects such adjustments.
    """
    prompt, *options = line.strip().split(" --")
    result: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name not in _LINE_OPTIONS:
            logger.warning("%s: unknown option --%s ignored", where, shorten(name, 40))
            continue
        key, convert = _LINE_OPTIONS[name]
        if not value:
            raise UserError(f"{where}: option --{name} has no value; write e.g. '--{name} <value>'")
        try:
            converted = convert(value)
        except ValueError as e:
            raise UserError(f"{where}: option --{name} {shorten(value)} must be {e}") from None
        result[key] = _check_value(key, converted, f"{where}: option --{name}", notes, clamp_steps=True)
        if key == "sample_sampler":
            check_sampler_name(value, f"{where}: option --ss")
    return result


def _check_dict(item: Any, where: str, notes: list[str] | None = None) -> dict[str, Any]:
    if isinstance(item, str):
        return line_to_prompt_dict(item, where, notes)
    if not isinstance(item, dict):
        raise UserError(f"{where}: a prompt must be a table/object or a string, not {type(item).__name__}")
    for key, value in item.items():
        if key not in _KEY_TYPES:
            raise UserError(f"{where}: unknown key {shorten(key)}; valid keys: {', '.join(_KEY_TYPES)}")
        types = _KEY_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise UserError(f"{where}: key {key!r} must be {wanted}, not {shorten(value)}")
        _check_value(key, value, f"{where}: key {key!r}", notes)
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


def _from_txt(path: Path, text: str, notes: list[str] | None) -> list[dict[str, Any]]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(line_to_prompt_dict(stripped, f"{path}:{number}", notes))
    return prompts


def _subset_prompts(path: Path, table: dict[str, Any], notes: list[str] | None) -> list[dict[str, Any]]:
    """sd-scripts' layout: a ``[prompt]`` table of defaults with ``[[prompt.subset]]`` tables."""
    defaults = {k: v for k, v in table.items() if k != "subset"}
    prompts = []
    for i, subset in enumerate(table["subset"]):
        where = f"{path}: [[prompt.subset]] #{i + 1}"
        if not isinstance(subset, dict):
            raise UserError(
                f"{where}: must be a table with a 'prompt' key, not {type(subset).__name__} {shorten(subset)}; "
                "write [[prompt.subset]] tables"
            )
        prompts.append(_check_dict({**defaults, **subset}, where, notes))
    return prompts


def _from_toml(path: Path, text: str, notes: list[str] | None) -> list[dict[str, Any]]:
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid TOML: {shorten(e.msg, 120)}") from None
    table = data.get("prompt")
    if isinstance(table, list):
        return [_check_dict(item, f"{path}: [[prompt]] #{i + 1}", notes) for i, item in enumerate(table)]
    if isinstance(table, dict) and "subset" in table:
        if not isinstance(table["subset"], list):
            raise UserError(
                f"{path}: [prompt] subset must be a list of [[prompt.subset]] tables, not "
                f"{type(table['subset']).__name__} {shorten(table['subset'])}"
            )
        return _subset_prompts(path, table, notes)
    raise UserError(
        f"{path}: no prompts found; write [[prompt]] tables, or a [prompt] table of defaults with [[prompt.subset]] "
        "tables, each with a 'prompt' key"
    )


def _from_json(path: Path, text: str, notes: list[str] | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {shorten(e.msg, 120)}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: must hold a JSON list of prompt objects, not a {type(data).__name__}")
    return [_check_dict(item, f"{path}: item #{i + 1}", notes) for i, item in enumerate(data)]


def load_prompts(path: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Read a prompt file into sd-scripts' prompt dicts, each with ``enum`` set to its position.

    Every value is checked (see the module docstring); ``notes``, when given, collects the adjustments sd-scripts
    makes silently (clamped steps, rounded sizes), one line each naming the file, line or entry, and option.
    """
    path = Path(path)
    readers = {".txt": _from_txt, ".toml": _from_toml, ".json": _from_json}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"--sample_prompts {path}: unsupported file type; use a .txt, .toml or .json file")
    prompts = reader(path, _read_text(path), notes)
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
