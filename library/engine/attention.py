"""The UNet's attention implementation from --sdpa / --xformers / --mem_eff_attn, with honest fallbacks.

PyTorch's scaled-dot-product attention (SDPA) is the default: it is built in, fast and memory-efficient on CUDA.
``--xformers`` needs the xformers package and a CUDA device; without either the run falls back to SDPA with a
one-line warning instead of failing. ``--mem_eff_attn`` (sd-scripts' chunked attention that trades speed for memory)
maps to diffusers' attention slicing, which computes attention a few heads at a time on any device.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

logger = logging.getLogger("sdtrain")

SDPA, XFORMERS, SLICED = "sdpa", "xformers", "sliced"


@dataclass(frozen=True)
class AttentionSettings:
    """The attention flags (``--diffusers_xformers`` is fine_tune.py's spelling of ``--xformers``); SDPA needs none."""

    xformers: bool = False
    diffusers_xformers: bool = False
    mem_eff_attn: bool = False


def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def choose_attention(*, xformers: bool, mem_eff_attn: bool, device: torch.device, have_xformers: bool) -> str:
    """Which attention to use; --mem_eff_attn wins over --xformers (as in sd-scripts), SDPA otherwise."""
    if mem_eff_attn:
        if xformers:
            logger.warning("--mem_eff_attn and --xformers both given: using --mem_eff_attn (attention slicing)")
        return SLICED
    if not xformers:
        return SDPA
    if not have_xformers:
        logger.warning("--xformers: the xformers package is not installed; using PyTorch SDPA attention instead")
        return SDPA
    if device.type != "cuda":
        logger.warning(f"--xformers: xformers needs a CUDA device, this run is on {device.type}; using SDPA instead")
        return SDPA
    return XFORMERS


def apply_attention(unet: nn.Module, choice: str) -> str:
    """Set the UNet's attention processors for ``choice``; returns what was applied (SDPA if xformers fails)."""
    if choice == XFORMERS:
        try:
            unet.enable_xformers_memory_efficient_attention()
            return XFORMERS
        except Exception as e:  # xformers builds fail in many library-specific ways; SDPA always works
            logger.warning(f"--xformers: cannot enable xformers ({e}); using PyTorch SDPA attention instead")
            choice = SDPA
    if choice == SLICED:
        unet.set_attention_slice("auto")
        logger.info("--mem_eff_attn: attention is computed in slices of heads (less memory, somewhat slower)")
        return SLICED
    unet.set_attn_processor(AttnProcessor2_0())
    return SDPA


def attention_from_settings(settings: AttentionSettings, unet: nn.Module, device: torch.device) -> str:
    """Apply the attention flags to ``unet`` for a run on ``device``; returns ``"sdpa"``, ``"xformers"`` or
    ``"sliced"``."""
    choice = choose_attention(
        xformers=settings.xformers or settings.diffusers_xformers,
        mem_eff_attn=settings.mem_eff_attn,
        device=device,
        have_xformers=xformers_installed(),
    )
    return apply_attention(unet, choice)
