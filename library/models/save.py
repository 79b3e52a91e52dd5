"""Saving a model as a single file in its family's layout (.ckpt / .safetensors) or a diffusers folder, atomically."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.io import atomic_dir, atomic_save, save_safetensors
from library.models.components import Components
from library.models.detect import CONFIG_KEY, configs_json

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
PRECISIONS: dict[str | None, torch.dtype | None] = {
    None: None,
    "float": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def save_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype for ``--save_precision`` (None keeps each tensor's own dtype)."""
    if precision not in PRECISIONS:
        raise UserError(f"--save_precision: unknown value {precision!r}; use one of float, fp16, bf16")
    return PRECISIONS[precision]


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached copies in ``dtype`` with their own compact storage (views are not saved with their base)."""
    out = {}
    for key, value in state_dict.items():
        t = value.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.contiguous().clone()
        out[key] = t.cpu()
    return out


def save_model(
    components: Components,
    path: str | os.PathLike,
    save_as: str,
    precision: str | None = None,
    metadata: Mapping[str, str] | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> Path:
    """Write the model; ``save_as`` is sd-scripts' ``--save_model_as``. Returns the written path.

    Single files carry our exact diffusers configs (safetensors metadata / a string entry of the ckpt dict) so
    they load back into the same architecture; ``metadata`` is added to safetensors files.
    """
    if save_as not in SAVE_FORMATS:
        raise UserError(f"--save_model_as: unknown format {save_as!r}; use one of {', '.join(SAVE_FORMATS)}")
    dtype = save_dtype(precision)
    path = Path(path)
    if save_as in ("ckpt", "safetensors"):
        _save_single_file(components, path, save_as, dtype, metadata, epoch, global_step)
    else:
        _save_diffusers(components, path, save_as == "diffusers_safetensors", dtype)
    return path


def _save_single_file(components, path, save_as, dtype, metadata, epoch, global_step) -> None:
    state_dict = _cast(components.family.to_checkpoint(components), dtype)
    configs = configs_json(components)
    if save_as == "safetensors":
        save_safetensors(state_dict, path, metadata={**dict(metadata or {}), CONFIG_KEY: configs})
        return
    payload = {"state_dict": state_dict, "epoch": epoch, "global_step": global_step, CONFIG_KEY: configs}
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def _write_weights(state_dict: dict[str, torch.Tensor], folder: Path, stem: str, safe: bool) -> None:
    if safe:
        save_file(state_dict, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state_dict, folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))


def _text_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's weights under the names every transformers version reads: ``text_model.*`` (transformers
    5 drops that prefix for CLIPTextModel only), with ``text_projection`` left at the top level where it lives."""
    state = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if any(k.startswith("text_model.") for k in state):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


def _save_diffusers(components: Components, path: Path, safe: bool, dtype: torch.dtype | None) -> None:
    """A diffusers folder; text encoders keep the ``text_model.`` key names every transformers version reads."""
    c = components
    with atomic_dir(path) as tmp:
        c.to_pipeline().save_config(tmp)
        for name, model in (("unet", c.unet), ("vae", c.vae)):
            (tmp / name).mkdir()
            model.save_config(tmp / name)
            _write_weights(_cast(model.state_dict(), dtype), tmp / name, "diffusion_pytorch_model", safe)
        for name, text_encoder in zip(c.family.text_encoder_folders, c.text_encoders):
            (tmp / name).mkdir()
            text_config = copy.deepcopy(text_encoder.config)
            text_config.architectures = [type(text_encoder).__name__]
            text_config.save_pretrained(tmp / name)
            _write_weights(_cast(_text_state_dict(text_encoder), dtype), tmp / name, "model", safe)
        for name, tokenizer in zip(c.family.tokenizer_folders, c.tokenizers):
            tokenizer.save_pretrained(tmp / name)
        c.scheduler.save_pretrained(tmp / "scheduler")
