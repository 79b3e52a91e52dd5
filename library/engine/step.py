"""One forward pass: batch → scaled latents → the family's conditioning → noise → prediction → weighted loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.engine.parts import LossInputs, TrainingParts
from library.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped before anything poisoned was saved."""


@dataclass(frozen=True)
class StepModels:
    """The modules a forward pass uses, with one text encoder and tokenizer per encoder of the model family;
    ``unet``/``text_encoders`` carry the trained parts, ``vae_scale`` is the family's latent scale."""

    unet: nn.Module
    text_encoders: Sequence[nn.Module]
    tokenizers: Sequence[Any]
    vae: nn.Module
    vae_scale: float


@dataclass(frozen=True)
class BatchLoss:
    """One batch's mean weighted loss, its weighted per-sample losses (detached) and whether its latents were
    finite (for the divergence message)."""

    loss: torch.Tensor
    latents_finite: bool
    per_sample: torch.Tensor


def batch_latents(
    batch: dict[str, Any],
    vae: nn.Module,
    scale: float,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    """Cached latents, or the VAE's encoding of the batch's images (sampled with ``generator``), times ``scale``.

    Images are encoded wherever the VAE is (it stays off the accelerator when latents are cached)."""
    if batch.get("latents") is not None:
        latents = batch["latents"].to(device)
    else:
        images = batch.get("images")
        if images is None:
            raise ValueError("a batch needs 'latents' or 'images'")
        vae_param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(images.to(vae_param.device, dtype=vae_param.dtype)).latent_dist
            latents = dist.sample(generator=generator).to(device)
    return (latents * scale).to(dtype)


def batch_loss(
    batch: dict[str, Any],
    *,
    models: StepModels,
    parts: TrainingParts,
    autocast: contextlib.AbstractContextManager,
    generator: torch.Generator,
    device: torch.device,
    weight_dtype: torch.dtype,
    train_text_encoder: bool,
    step: int,
) -> BatchLoss:
    """The mean of the per-sample losses, each multiplied by its ``loss_weights`` entry."""
    latents = batch_latents(batch, models.vae, models.vae_scale, device, weight_dtype, generator)
    with torch.set_grad_enabled(train_text_encoder):
        conditioning = parts.encode_text(models.text_encoders, models.tokenizers, list(batch["captions"]), batch)
    conditioning = conditioning.to(device, weight_dtype)
    noisy_latents, noise, timesteps, target = parts.add_noise(latents, generator)
    with autocast:
        model_pred = conditioning.predict(models.unet, noisy_latents, timesteps)
    masks = batch.get("alpha_masks")
    per_sample = parts.loss(
        LossInputs(
            model_pred=model_pred.float(),
            target=target.float(),
            latents=latents.float(),
            noise=noise.float(),
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            alpha_masks=None if masks is None else masks.to(device),
            step=step,
            generator=generator,
        )
    )
    weights = batch.get("loss_weights")
    if weights is not None:
        per_sample = per_sample * torch.as_tensor(weights, device=per_sample.device, dtype=per_sample.dtype)
    return BatchLoss(
        loss=per_sample.mean(), latents_finite=bool(torch.isfinite(latents).all()), per_sample=per_sample.detach()
    )


def divergence_message(
    what: str, step: int, epoch: int, batch_index: int, latents_finite: bool, mixed_precision: str, no_half_vae: bool
) -> str:
    """One line naming where the loss broke and the likely cause."""
    where = f"{what} at step {step} (epoch {epoch + 1}, batch {batch_index + 1})"
    if not latents_finite:
        cause = "the latents themselves are NaN/inf"
        if mixed_precision != "no" and not no_half_vae:
            cause += ": the VAE overflows in half precision, add --no_half_vae"
        else:
            cause += ": check the images (or delete stale latent caches)"
    else:
        cause = "likely the learning rate is too high (lower --learning_rate / --unet_lr / --text_encoder_lr)"
        if mixed_precision == "fp16":
            cause += ", or fp16 overflow (try --mixed_precision bf16)"
    return f"{where}: {cause}. Training stopped before saving; use --nan_policy skip to skip such steps instead"


def weights_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one device synchronisation for all of them)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(flags).all()) if flags else True


def non_finite_weights_message(step: int, path: Path) -> str:
    """One line for trained weights that hold NaN/inf when ``path`` is about to be saved after ``step`` steps."""
    return (
        f"the trained weights hold NaN/inf at step {step}, so {path.name} was not saved: likely the learning rate "
        "is too high or its schedule is broken (check --learning_rate, --unet_lr/--text_encoder_lr, --lr_scheduler "
        "and its options). Training stopped; earlier saves are kept"
    )
