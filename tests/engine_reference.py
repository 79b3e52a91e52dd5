"""Pieces of the hand-written training loops the engine tests compare the engine against: the UNet ``conv_out``
tensors as the only trainable parameters, and one batch's loss computed step by step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from library.engine import TrainingParts
from library.models.components import Components


def train_conv_out_only(components: Components) -> list[torch.nn.Parameter]:
    """Freeze the UNet and text encoder except the UNet's ``conv_out``, and return its parameters."""
    components.unet.requires_grad_(False)
    components.text_encoder.requires_grad_(False)
    params = list(components.unet.conv_out.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def reference_batch_loss(
    components: Components, parts: TrainingParts, batch: dict, generator: torch.Generator
) -> torch.Tensor:
    """The per-sample loss of ``batch`` as the engine computes it: latents scaled by 0.18215, noised by ``parts``,
    MSE of the UNet prediction against the target, times the batch's loss weights."""
    latents = batch["latents"] * 0.18215
    cond = parts.encode_text(components.text_encoders, components.tokenizers, batch["captions"], batch)
    noisy, _, t, target = parts.add_noise(latents, generator)
    pred = components.unet(noisy, t, cond.hidden_states, **cond.unet_kwargs).sample
    return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * batch["loss_weights"]
