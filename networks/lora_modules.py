"""sd-scripts' LoRA module (``lora_down``/``lora_up``/``alpha``) and the LoRA file helpers shared by the networks.

Same initialisation, scale rule (alpha / dim) and dropouts as kohya sd-scripts' networks/lora.py; text-encoder
keys are always spelled with ``text_model`` (the transformers-4 names every LoRA client expects).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from library.io import load_pickle_checkpoint, load_safetensors
from library.lora_family.diffusers_keys import is_diffusers_layout, to_sd_scripts
from networks.network_base import HookedLayer


class LoRAModule(HookedLayer):
    """Adds ``up(down(x)) * multiplier * alpha / dim`` to one Linear or Conv2d by replacing its ``forward``."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            k, s, p = org_module.kernel_size, org_module.stride, org_module.padding
            self.lora_down = torch.nn.Conv2d(org_module.in_channels, self.lora_dim, k, s, p, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # a plain list keeps the base layer out of this module's state dict
        self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output plus ``up(down(x)) * (multiplier * scale)``, in the base output's dtype.

        The two factors are one multiply, skipped when it is 1 (x * 1.0 is exact), and dtype casts happen only when
        the base model runs in another precision than the LoRA weights, so the common fp32 case costs no extra op.
        """
        org_out = self._org_forward(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out
        lora_down = self.lora_down
        dtype = lora_down.weight.dtype
        lx = lora_down(x if x.dtype == dtype else x.to(dtype))  # base model may be in a lower precision
        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale / (1.0 - self.rank_dropout)
        out = self.lora_up(lx)
        factor = self.multiplier * scale
        if factor != 1.0:
            out = out * factor
        return org_out + (out if out.dtype == org_out.dtype else out.to(org_out.dtype))

    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add this LoRA's weights (``lora_up.weight``/``lora_down.weight`` in ``sd``) into the base layer."""
        up = sd["lora_up.weight"].to(device, torch.float)
        down = sd["lora_down.weight"].to(device, torch.float)
        weight = self.org_module.weight
        merged = weight.detach().to(device, torch.float) + self.multiplier * delta_weight(up, down) * self.scale
        with torch.no_grad():
            weight.copy_(merged.to(dtype or weight.dtype))


def delta_weight(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The full weight ``up @ down`` of a LoRA pair for Linear, 1x1 and kxk convolutions (unscaled).

    The up half of a convolution pair is always 1x1, so one matrix product gives the kxk kernel (the same numbers
    sd-scripts gets from a convolution of the two kernels).
    """
    if down.dim() == 2:
        return up @ down
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def text_encoder_module_path(path: str) -> str:
    """transformers-4 spelling of a CLIP module path (``text_model.encoder…``), which every LoRA file uses."""
    return path if path.startswith("text_model.") or path == "text_model" else f"text_model.{path}"


def normalize_lora_key(key: str) -> str:
    """Map a text-encoder key written without ``text_model`` (transformers-5 tools) onto the standard spelling."""
    m = re.match(r"(lora_te\d?_)(encoder_|embeddings_|final_layer_norm)", key)
    return f"{m.group(1)}text_model_{key[len(m.group(1)) :]}" if m else key


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors, or a weights-only pickle (``.ckpt``/``.pt``); a file in diffusers/PEFT
    layout (``unet.….lora_A.weight``) comes back in sd-scripts names, alphas from its PEFT config header."""
    if Path(file).suffix.lower() == ".safetensors":
        sd, metadata = load_safetensors(file)
    else:
        sd, metadata = load_pickle_checkpoint(file), {}
    return to_sd_scripts(sd, metadata, str(file)) if is_diffusers_layout(sd) else sd


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA state dict with every text-encoder key in the standard spelling (diffusers/PEFT layouts renamed,
    alpha = rank where the dict carries none, as diffusers reads them)."""
    if is_diffusers_layout(sd):
        sd = to_sd_scripts(sd)
    return {normalize_lora_key(k): v for k, v in sd.items()}


def module_tensors(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors grouped by module name: ``{"lora_unet_x": {"lora_down.weight": …, "alpha": …}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, dot, rest = key.partition(".")
        if dot:
            grouped.setdefault(name, {})[rest] = value
    return grouped
