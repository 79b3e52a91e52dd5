"""LyCORIS (``--network_module lycoris.kohya``) presets that target each module once, without state between runs.

LyCORIS 4.1 added the module class ``TimestepEmbedding`` (for Anima) to the ``full`` preset's UNet classes while
keeping ``time_embedding.linear_1/2`` among its UNet names. SD 1.x/2.x UNets (diffusers' and sd-scripts' own
``original_unet.py`` alike) have a ``time_embedding`` of that class, so its two linears are reached twice: once by
the class walk, once by name. LyCORIS then builds two modules with one name and stops at its duplicate-name
assertion. kohya_ss pins LyCORIS 3.2, whose ``full`` preset has no ``TimestepEmbedding``, so there every module is
targeted once. Here a name pattern is dropped from the preset when every module it names is still reached, with
the same settings, by the class walk; the modules created are then exactly the ones the preset's rules name.

LyCORIS keeps the preset in class attributes of ``LycorisNetworkKohya`` (``apply_preset``), so a preset applied
for one network stays for the next. Each creation here starts from LyCORIS's own defaults (its ``full`` preset)
and puts the attributes back as they were afterwards.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import toml
from torch import nn

from library.errors import UserError

# preset key -> class attribute of LycorisNetworkKohya that ``apply_preset`` sets from it
PRESET_ATTRIBUTES = {
    "enable_conv": "ENABLE_CONV",
    "unet_target_module": "UNET_TARGET_REPLACE_MODULE",
    "unet_target_name": "UNET_TARGET_REPLACE_NAME",
    "text_encoder_target_module": "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "text_encoder_target_name": "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "module_algo_map": "MODULE_ALGO_MAP",
    "name_algo_map": "NAME_ALGO_MAP",
    "use_fnmatch": "USE_FNMATCH",
    "exclude_name": "TARGET_EXCLUDE_NAME",
}
# a preset that targets nothing: for the throw-away network LyCORIS builds while loading a file
EMPTY_PRESET = {
    "enable_conv": True,
    "unet_target_module": [],
    "unet_target_name": [],
    "text_encoder_target_module": [],
    "text_encoder_target_name": [],
}


def network_class(module: Any) -> Any:
    """LyCORIS's ``LycorisNetworkKohya`` when ``module`` is ``lycoris.kohya`` (or looks like it), else None."""
    cls = getattr(module, "LycorisNetworkKohya", None)
    return cls if cls is not None and hasattr(cls, "apply_preset") else None


def builtin_presets() -> dict[str, dict[str, Any]]:
    """LyCORIS's named presets (``full``, ``attn-mlp``, …) as dicts."""
    from lycoris.config import PRESET

    return PRESET


def default_preset() -> dict[str, Any]:
    """The preset state of a fresh process: LyCORIS's class defaults are its ``full`` preset with empty maps."""
    base = {"module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
    return base | copy.deepcopy(builtin_presets()["full"])


def resolve_preset(preset: str) -> dict[str, Any]:
    """``preset=`` from ``--network_args`` (a built-in name or a TOML file) as a complete preset dict."""
    presets = builtin_presets()
    if preset in presets:
        return default_preset() | copy.deepcopy(presets[preset])
    path = Path(preset)
    if not path.is_file():
        names = ", ".join(sorted(presets))
        raise UserError(
            f"--network_args preset={preset}: neither a LyCORIS preset ({names}) nor a preset TOML file; "
            "check the name or path"
        )
    try:
        loaded = toml.load(path)
        if importlib.util.find_spec("lycoris.config_sdk") is not None:  # LyCORIS 4 checks the keys; 3.x takes it as is
            from lycoris.config_sdk import PresetConfig

            loaded = PresetConfig.from_dict(loaded).to_dict()
    except (toml.TomlDecodeError, OSError, TypeError, ValueError) as e:  # PresetValidationError is a ValueError
        raise UserError(f"--network_args preset={preset}: not a valid LyCORIS preset file ({e})") from e
    return default_preset() | loaded


def matcher(preset: dict[str, Any]) -> Callable[[str, str], bool]:
    """``match(pattern, name)`` as LyCORIS matches target and exclude names: fnmatch or a regex from the start."""
    if preset.get("use_fnmatch"):
        return lambda pattern, name: fnmatch.fnmatch(name, pattern)

    def regex(pattern: str, name: str) -> bool:
        try:
            return re.match(pattern, name) is not None
        except re.error as e:
            raise UserError(f"LyCORIS preset: '{pattern}' is not a valid regular expression ({e})") from e

    return regex


def reached(root: nn.Module, classes: list[str], names: list[str], preset: dict[str, Any]) -> Counter[str]:
    """How many times LyCORIS's walk reaches each module path of ``root``: once per target class that contains it
    (the class walk takes the whole block) plus once when a target name matches it (and its class isn't walked)."""
    match = matcher(preset)
    exclude = preset.get("exclude_name") or []

    def excluded(path: str) -> bool:
        return bool(path) and (path in exclude or any(match(t, path) for t in exclude))

    counts: Counter[str] = Counter()
    for name, module in root.named_modules():
        if excluded(name):
            continue
        named = name in names or any(match(t, name) for t in names)
        if type(module).__name__ in classes and not any(match(t, name) for t in names):
            for sub, _ in module.named_modules():
                path = f"{name}.{sub}" if name and sub else name or sub
                if not excluded(path):
                    counts[path] += 1
        elif named:
            counts[name] += 1
    return counts


def plain_settings(root: nn.Module, paths: set[str], preset: dict[str, Any]) -> bool:
    """Whether every module at ``paths`` gets the plain algo from both routes: no ``name_algo_map`` entry names it
    and no class on the way to it (itself included) has a ``module_algo_map`` entry."""
    match = matcher(preset)
    name_map, module_map = preset.get("name_algo_map") or {}, preset.get("module_algo_map") or {}
    for path in paths:
        if path in name_map or any(match(key, path) for key in name_map):
            return False
        module, parts = root, path.split(".") if path else []
        if type(module).__name__ in module_map:
            return False
        for part in parts:
            module = module.get_submodule(part)
            if type(module).__name__ in module_map:
                return False
    return True


def deduplicated_names(root: nn.Module, classes: list[str], names: list[str], preset: dict[str, Any]) -> list[str]:
    """``names`` without the patterns whose modules the class walk reaches anyway, with the same settings: the
    same modules are then built, each once."""
    kept = list(names)
    counts = reached(root, classes, kept, preset)
    match = matcher(preset)
    for pattern in names:
        trial = [t for t in kept if t != pattern]
        after = reached(root, classes, trial, preset)
        hits = {p for p, _ in root.named_modules() if p == pattern or match(pattern, p)}
        fewer = sum(after.values()) < sum(counts.values()) and all(after[p] <= n for p, n in counts.items())
        if fewer and after.keys() == counts.keys() and plain_settings(root, hits, preset):
            kept, counts = trial, after
    return kept


def text_encoder_list(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def deduplicated_preset(preset: dict[str, Any], text_encoder: Any, unet: nn.Module) -> dict[str, Any]:
    """``preset`` with its UNet and text-encoder target names reduced so that no module is targeted twice (a
    text-encoder name stays when any of the text encoders needs it)."""
    out = copy.deepcopy(preset)
    out["unet_target_name"] = deduplicated_names(unet, out["unet_target_module"], out["unet_target_name"], out)
    names = out["text_encoder_target_name"]
    needed = [
        set(deduplicated_names(te, out["text_encoder_target_module"], names, out))
        for te in text_encoder_list(text_encoder)
    ]
    out["text_encoder_target_name"] = [t for t in names if not needed or any(t in kept for kept in needed)]
    return out


@contextmanager
def preset_scope(cls: Any, preset: dict[str, Any]) -> Iterator[None]:
    """Apply ``preset`` (complete: every key LyCORIS keeps) to ``cls`` and put the previous settings back after."""
    saved = {key: getattr(cls, attr) for key, attr in PRESET_ATTRIBUTES.items() if hasattr(cls, attr)}
    cls.apply_preset({key: value for key, value in preset.items() if key in saved})
    try:
        yield
    finally:
        cls.apply_preset(saved)


def create_network(
    module: Any,
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module,
    text_encoder: Any,
    unet: nn.Module,
    **options: Any,
) -> Any:
    """``module.create_network(…)`` (sd-scripts' interface); for LyCORIS with a preset that targets each module once,
    starting from LyCORIS's defaults and leaving no preset behind."""
    args = (multiplier, network_dim, network_alpha, vae, text_encoder, unet)
    cls = network_class(module)
    if cls is None:
        return module.create_network(*args, **options)
    name = str(options.get("preset") or "full")
    preset = resolve_preset(name)
    fixed = deduplicated_preset(preset, text_encoder, unet)
    with preset_scope(cls, fixed):
        if fixed == preset and name in builtin_presets():
            return module.create_network(*args, **options)
        with tempfile.TemporaryDirectory(prefix="lycoris-preset-") as folder:
            path = Path(folder) / "preset.toml"
            path.write_text(toml.dumps(fixed))
            return module.create_network(*args, **{**options, "preset": str(path)})


def create_network_from_weights(
    module: Any, multiplier: float, file: str, vae: nn.Module, text_encoder: Any, unet: nn.Module, **options: Any
) -> Any:
    """``module.create_network_from_weights(…)`` (sd-scripts' interface); for LyCORIS with an empty preset for the
    throw-away network it builds first (its defaults would fail on SD UNets)."""
    args = (multiplier, file, vae, text_encoder, unet)
    cls = network_class(module)
    if cls is None:
        return module.create_network_from_weights(*args, **options)
    with preset_scope(cls, default_preset() | EMPTY_PRESET):
        try:
            return module.create_network_from_weights(*args, **options)
        except TypeError as e:
            if "make_module_from_state_dict" not in str(e):
                raise
            raise UserError(
                f"{file}: LyCORIS cannot rebuild a network from this file ({e}); LyCORIS 4.1 fails this way on "
                "iA3 files, so give --network_weights without --dim_from_weights (and not as --base_weights)"
            ) from e
