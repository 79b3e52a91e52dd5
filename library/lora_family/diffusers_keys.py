"""LoRA files in diffusers' and PEFT's key layouts, renamed to the sd-scripts names every other reader here uses.

diffusers' ``save_lora_weights`` writes ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` (PEFT), and its
older layouts ``….lora.down.weight`` / ``….lora_linear_layer.up.weight`` / ``….processor.to_q_lora.down.weight``,
under a component prefix (``unet.``, ``text_encoder.``, ``text_encoder_2.``), often mixed in one file. Alphas come
from ``….alpha`` tensors, else from the PEFT config diffusers stores in the ``lora_adapter_metadata`` header
(``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank (scale 1), as diffusers loads them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch

from library.errors import UserError

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors header entry holding the PEFT ``LoraConfig`` of each component, keys prefixed ``unet.`` etc."""

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SUFFIXES = (
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".alpha", "alpha"),
)
_ATTN_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def is_diffusers_layout(keys) -> bool:
    """Whether every key of a file is in diffusers/PEFT layout (a ``unet.``/``text_encoder.``/``text_encoder_2.``
    component prefix) rather than sd-scripts' ``lora_unet_…``/``lora_te_…`` module names; mixed files are neither."""
    keys = list(keys)
    return bool(keys) and all(str(k).partition(".")[0] in _COMPONENTS for k in keys)


def _split(component: str, rest: str, where: str, key: str) -> tuple[str, str]:
    """``(module path inside the component, our tensor key)`` of one diffusers key."""
    for suffix, ours in _SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], ours
    m = _ATTN_PROCESSOR.match(rest)
    if m:
        attn, proj, half = m.groups()
        path = f"{attn}.{_TE_PROJ[proj]}" if component != "unet" else f"{attn}.{proj}" + (".0" * (proj == "to_out"))
        return path, f"lora_{half}.weight"
    if "lora_magnitude_vector" in rest:
        raise UserError(
            f"{where}{key!r}: a PEFT DoRA file (lora_magnitude_vector); only plain diffusers/PEFT LoRA is read, "
            "or save it as an sd-scripts/LyCORIS DoRA (dora_scale)"
        )
    raise UserError(
        f"{where}unknown diffusers/PEFT key {key!r}; expected '<component>.<module>.lora_A.weight'/'lora_B.weight' "
        "(or 'lora.down'/'lora.up', 'lora_linear_layer.down'/'up', '.alpha')"
    )


def adapter_configs(metadata: Mapping[str, str] | None, source: str = "") -> dict[str, dict]:
    """The PEFT ``LoraConfig`` per component (``{"unet": {"r": 4, "lora_alpha": 8, …}}``) from a file's header;
    empty when the file has none."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: the {METADATA_KEY} header is not valid JSON ({e})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, dot, field = str(key).rpartition(".")
        if dot and component in _COMPONENTS:
            configs.setdefault(component, {})[field] = value
    return configs


def _config_alpha(config: Mapping, path: str, rank: int) -> float:
    """The alpha PEFT gives the module at ``path`` (``alpha_pattern`` by PEFT's suffix rule, else ``lora_alpha``),
    in sd-scripts' convention (scale = alpha / rank; rsLoRA's alpha / sqrt(rank) folded in)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    alpha = float(alpha)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def to_sd_scripts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = ""
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout LoRA state dict as sd-scripts keys (``lora_unet_…``, ``lora_te_text_model_…``,
    SDXL: ``lora_te1_``/``lora_te2_``; SDXL UNet names stay diffusers-spelled, which our readers map) with an
    ``alpha`` per module. Keys outside the known layouts are a one-line UserError naming ``source``."""
    where = f"{source}: " if source else ""
    two_encoders = any(str(k).startswith("text_encoder_2.") for k in tensors)
    prefixes = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if two_encoders else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    configs = adapter_configs(metadata, source)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    first_key: dict[tuple[str, str], str] = {}
    for key, value in tensors.items():
        component, dot, rest = str(key).partition(".")
        if not dot or component not in _COMPONENTS:
            raise UserError(f"{where}key {key!r} mixes sd-scripts and diffusers layouts; the file is not one LoRA")
        path, ours = _split(component, rest, where, key)
        modules.setdefault((component, path), {})[ours] = value
        first_key.setdefault((component, path), str(key))
    out: dict[str, torch.Tensor] = {}
    for (component, path), parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            half = "lora_A" if "lora_up.weight" in parts else "lora_B"
            raise UserError(
                f"{where}unknown key layout (e.g. {first_key[(component, path)]!r}): diffusers/PEFT module "
                f"{component}.{path} has no {half} weight; the file is incomplete"
            )
        rank = parts["lora_down.weight"].shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        elif component in configs:
            alpha = _config_alpha(configs[component], path, rank)
        else:
            alpha = float(rank)
        text_path = (
            path if component == "unet" or path.startswith(("text_model.", "text_projection")) else f"text_model.{path}"
        )
        name = f"{prefixes[component]}_{text_path.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = parts["lora_down.weight"]
        out[f"{name}.lora_up.weight"] = parts["lora_up.weight"]
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out
