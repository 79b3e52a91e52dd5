"""Reading and writing LoRA-family files: safetensors (or a weights-only ``.pt``/``.ckpt`` pickle) plus metadata.

Writes are atomic, carry the ``sshs_*`` hashes sd-scripts writes, and take sd-scripts' ``--save_precision`` names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.io import atomic_save, load_pickle_checkpoint, load_safetensors, save_safetensors
from library.lora_family.diffusers_keys import is_diffusers_layout, to_sd_scripts
from library.metadata import precalculate_safetensors_hashes

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""``--save_precision`` names (sd-scripts: ``float``, ``fp16``, ``bf16``; ``fp32`` too) → dtype."""


@dataclass
class LoraFile:
    """The tensors and (string) metadata of one LoRA-family file, and where it came from."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""


def save_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype for a ``--save_precision`` value (None keeps each tensor's own dtype); a UserError otherwise."""
    if precision is None:
        return None
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise UserError(
            f"--save_precision {precision!r}: unknown precision; use one of {', '.join(PRECISIONS)}"
        ) from None


def read_lora_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> LoraFile:
    """Read a LoRA-family file; a missing, truncated or non-LoRA file is a one-line UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = load_safetensors(path)
    else:
        loaded = load_pickle_checkpoint(path, allow_unsafe=allow_unsafe_pickle)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: not a LoRA file (the pickle holds a {type(loaded).__name__}, not tensors)")
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        metadata = {}
    if not tensors:
        raise UserError(f"{path}: the file holds no tensors; is it a LoRA file?")
    tensors = {str(k): v for k, v in tensors.items()}
    if is_diffusers_layout(tensors):  # diffusers/PEFT files: our names, alphas from their header
        tensors = to_sd_scripts(tensors, metadata, str(path))
    return LoraFile(tensors, dict(metadata), str(path))


def write_lora_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    precision: str | torch.dtype | None = None,
) -> None:
    """Write tensors atomically in ``precision`` (name or dtype; floating tensors only): safetensors with the
    metadata plus ``sshs_model_hash``/``sshs_legacy_hash``, or a torch pickle for any other suffix."""
    dtype = save_dtype(precision) if isinstance(precision, str) or precision is None else precision
    out = {
        k: v.detach().to("cpu", dtype=dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu()
        for k, v in tensors.items()
    }
    if Path(path).suffix.lower() == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(out, meta)
        save_safetensors(out, path, meta)
    else:
        atomic_save(path, lambda tmp: torch.save(out, tmp))
