"""Which layers a network adapts: sd-scripts' default targets, LyCORIS's named presets, or a LyCORIS preset TOML.

A preset names module classes (every Linear/Conv2d inside them is adapted) and module paths (regular expressions
matched from the start, or fnmatch patterns with ``use_fnmatch``), plus ``exclude_name`` patterns. Each layer is
adapted once however many rules reach it (LyCORIS 4.1 builds two modules with one name and fails). Class names are
matched along the class hierarchy, so ``Attention`` also covers diffusers' attention subclasses; the named presets
use diffusers' class names (LyCORIS's ``attn-only`` names LDM's ``CrossAttention``, which diffusers UNets lack).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import toml
from torch import nn

from library.errors import UserError

SD_UNET_ATTN = ("Transformer2DModel",)
SD_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
SD_TE = ("CLIPAttention", "CLIPMLP")
FULL_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


@dataclass(frozen=True)
class Preset:
    """Target rules for the UNet and text encoder(s); ``enable_conv`` None: kxk convs only when conv_dim is given."""

    unet_target_module: tuple[str, ...] = SD_UNET_ATTN
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_module: tuple[str, ...] = SD_TE
    text_encoder_target_name: tuple[str, ...] = ()
    exclude_name: tuple[str, ...] = ()
    enable_conv: bool | None = None
    use_fnmatch: bool = False
    name: str = field(default="sd-scripts", compare=False)

    def match(self, pattern: str, path: str) -> bool:
        """LyCORIS's name rule: equal, or fnmatch / a regular expression matched at the start."""
        if pattern == path:
            return True
        if self.use_fnmatch:
            return fnmatch.fnmatch(path, pattern)
        try:
            return re.match(pattern, path) is not None
        except re.error as e:
            raise UserError(f"preset {self.name}: '{pattern}' is not a valid regular expression ({e})") from e

    def targets(self, root: nn.Module, is_unet: bool, spellings: Callable[[str], tuple[str, ...]]) -> Iterator:
        """``(path, layer)`` for each Linear/Conv2d of ``root`` the rules reach, once each, in model order.

        ``spellings`` gives the paths a rule may be written against (a text-encoder path with and without
        ``text_model.``); the first spelling is the one returned."""
        classes = self.unet_target_module if is_unet else self.text_encoder_target_module
        names = self.unet_target_name if is_unet else self.text_encoder_target_name

        def hit(patterns: tuple[str, ...], path: str) -> bool:
            return any(self.match(p, s) for s in spellings(path) for p in patterns)

        seen: set[str] = set()
        walked: str | None = None  # the last class-matched block; named_modules lists its children right after it
        for path, module in root.named_modules():
            if path and hit(self.exclude_name, path):
                continue
            inside = walked is not None and (walked == "" or path.startswith(walked + "."))
            if not inside and classes and any(c.__name__ in classes for c in type(module).__mro__):
                walked = path
                for child_path, child in module.named_modules():
                    full = ".".join(p for p in (path, child_path) if p)
                    if not isinstance(child, (nn.Linear, nn.Conv2d)) or full in seen:
                        continue
                    if not hit(self.exclude_name, full):
                        seen.add(full)
                        yield spellings(full)[0], child
            elif names and isinstance(module, (nn.Linear, nn.Conv2d)) and path not in seen and hit(names, path):
                seen.add(path)
                yield spellings(path)[0], module


BUILTIN_PRESETS: dict[str, Preset] = {
    "attn-only": Preset(("Attention", "CrossAttention"), (), ("CLIPAttention",), enable_conv=False),
    "attn-mlp": Preset(SD_UNET_ATTN, (), SD_TE, enable_conv=False),
    "full": Preset(SD_UNET_ATTN + SD_UNET_CONV, FULL_UNET_NAMES, SD_TE, enable_conv=True),
    "full-lin": Preset(SD_UNET_ATTN + ("ResnetBlock2D",), FULL_UNET_NAMES[2:], SD_TE, enable_conv=False),
    "unet-only": Preset(SD_UNET_ATTN + SD_UNET_CONV, FULL_UNET_NAMES, (), enable_conv=True),
    "unet-transformer-only": Preset(SD_UNET_ATTN, (), (), enable_conv=False),
    "unet-convblock-only": Preset(SD_UNET_CONV, FULL_UNET_NAMES[:2], (), enable_conv=True),
}
PRESET_KEYS = (
    "unet_target_module unet_target_name text_encoder_target_module text_encoder_target_name exclude_name".split()
)


def default_preset(conv: bool) -> Preset:
    """sd-scripts' targets: Transformer2DModel and CLIP attention/MLP, plus the ResNet/sampler blocks for conv."""
    return Preset(SD_UNET_ATTN + SD_UNET_CONV if conv else SD_UNET_ATTN)


def resolve_preset(value: str | None, conv: bool) -> Preset:
    """``preset=`` of ``--network_args``: a built-in name, a LyCORIS preset TOML file, or None for sd-scripts'."""
    if value is None or not str(value).strip():
        return default_preset(conv)
    value = str(value).strip()
    if value in BUILTIN_PRESETS:
        preset = BUILTIN_PRESETS[value]
        return Preset(**{**preset.__dict__, "name": value})
    path = Path(value)
    if not path.is_file():
        raise UserError(
            f"--network_args preset={value}: neither a preset name ({', '.join(BUILTIN_PRESETS)}) nor a TOML file"
        )
    try:
        data = toml.load(path)
    except (toml.TomlDecodeError, OSError) as e:
        raise UserError(f"--network_args preset={value}: cannot read the preset TOML ({e})") from e
    for key in ("module_algo_map", "name_algo_map"):
        if data.get(key):
            raise UserError(f"{path}: {key} (a different algo per layer) is not supported; use lycoris.kohya")
    unknown = set(data) - set(PRESET_KEYS) - {"enable_conv", "use_fnmatch", "module_algo_map", "name_algo_map"}
    if unknown:
        raise UserError(f"{path}: unknown preset keys {sorted(unknown)}; known: {', '.join(PRESET_KEYS)}")
    lists = {}
    full = BUILTIN_PRESETS["full"]
    for key in PRESET_KEYS:  # a key the file leaves out keeps LyCORIS's default (its full preset), as apply_preset
        items = data.get(key, list(getattr(full, key)))
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise UserError(f"{path}: {key} must be a list of strings")
        lists[key] = tuple(items)
    return Preset(
        **lists,
        enable_conv=bool(data.get("enable_conv", True)),
        use_fnmatch=bool(data.get("use_fnmatch", False)),
        name=str(path),
    )
