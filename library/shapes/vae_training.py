"""A short dedicated training loop for the tiny-shapes VAE (an SD-layout ``AutoencoderKL``, 8x downsampling).

Reconstruction (L1 + MSE) plus a small KL term, AdamW with warm-up and cosine decay, on random crops of random
sizes from the generated scenes; the latent scaling factor is then set to 1/std of latents measured on the data, as
Stable Diffusion's was.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.io import atomic_dir

logger = logging.getLogger(__name__)

CROP_SIZES = (48, 56, 64)  # crop sides in pixels, multiples of 8 so latents are whole


@dataclass(frozen=True)
class VaeTrainSettings:
    """Architecture and loop settings of the VAE training."""

    channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    kl_weight: float = 1e-4
    decoder_steps: int = 600
    decoder_learning_rate: float = 3e-4
    seed: int = 0


def vae_config(settings: VaeTrainSettings) -> dict:
    """AutoencoderKL kwargs: SD's layout (one block per level, 4 levels so 8x downsampling, 4 latent channels)."""
    levels = len(settings.channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(settings.channels),
        layers_per_block=settings.layers_per_block,
        norm_num_groups=settings.norm_groups,
        latent_channels=4,
        sample_size=64,
        scaling_factor=1.0,
    )


def load_images(paths: Sequence[Path]) -> list[torch.Tensor]:
    """Images as ``(3, H, W)`` tensors in [-1, 1] (the VAE's input range)."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return out


def _random_batch(images: Sequence[torch.Tensor], batch_size: int, rng: random.Random) -> torch.Tensor:
    """``batch_size`` random crops of one random side (images smaller than it are used whole, resized)."""
    side = rng.choice(CROP_SIZES)
    crops = []
    for _ in range(batch_size):
        image = images[rng.randrange(len(images))]
        _, h, w = image.shape
        if h < side or w < side:
            image = torch.nn.functional.interpolate(image[None], size=(side, side), mode="bilinear")[0]
            h = w = side
        top, left = rng.randrange(h - side + 1), rng.randrange(w - side + 1)
        crop = image[:, top : top + side, left : left + side]
        crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    return torch.stack(crops)


def _lr_factor(step: int, settings: VaeTrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _whole(image: torch.Tensor) -> torch.Tensor:
    """``image`` cropped to sides that are multiples of 8 (whole latents)."""
    _, h, w = image.shape
    return image[:, : h - h % 8, : w - w % 8]


def measure_scaling_factor(vae: AutoencoderKL, images: Sequence[torch.Tensor], seed: int) -> float:
    """1/std of sampled latents over ``images`` (as SD's 0.18215 was measured), rounded to 5 digits."""
    generator = torch.Generator().manual_seed(seed)
    latents = []
    with torch.no_grad():
        for image in images:
            latents.append(vae.encode(_whole(image)[None]).latent_dist.sample(generator).flatten())
    return round(1.0 / torch.cat(latents).std().item(), 5)


def train_vae(images: Sequence[torch.Tensor], settings: VaeTrainSettings, log_every: int = 50) -> dict:
    """Train a VAE on ``images``; returns ``{"vae", "losses", "seconds", "steps_per_s", "scaling_factor"}``."""
    rng = random.Random(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = AutoencoderKL(**vae_config(settings))
        optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
        losses: list[float] = []
        start = time.perf_counter()
        vae.train()
        for step in range(settings.steps):
            batch = _random_batch(images, settings.batch_size, rng)
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            recon = (reconstruction - batch).abs().mean() + ((reconstruction - batch) ** 2).mean()
            loss = recon + settings.kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(recon.item())
            if log_every and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
                elapsed = time.perf_counter() - start
                recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                logger.info(
                    "vae step %d/%d: reconstruction loss %.4f, %.1f images/s",
                    step + 1,
                    settings.steps,
                    recent,
                    (step + 1) * settings.batch_size / elapsed,
                )
        seconds = time.perf_counter() - start
        vae.eval()
        scaling = measure_scaling_factor(vae, images[: min(len(images), 200)], settings.seed)
    vae.register_to_config(scaling_factor=scaling)
    return {
        "vae": vae,
        "losses": losses,
        "seconds": seconds,
        "steps_per_s": settings.steps / seconds if seconds else 0.0,
        "scaling_factor": scaling,
    }


def refine_decoder(vae: AutoencoderKL, images: Sequence[torch.Tensor], settings: VaeTrainSettings) -> dict:
    """Train only the decoder (encoder frozen, so latents and the scaling factor stay as they are) at a constant
    learning rate: it sharpens colours the joint loop left slightly off. Returns ``{"losses", "seconds"}``."""
    rng = random.Random(settings.seed + 1)
    frozen = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for parameter in frozen:
        parameter.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 1)
        optimizer = torch.optim.AdamW(trained, lr=settings.decoder_learning_rate, weight_decay=0.0)
        vae.train()
        for step in range(settings.decoder_steps):
            batch = _random_batch(images, settings.batch_size, rng)
            with torch.no_grad():
                latents = vae.encode(batch).latent_dist.sample()
            reconstruction = vae.decode(latents).sample
            loss = (reconstruction - batch).abs().mean() + ((reconstruction - batch) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == settings.decoder_steps:
                logger.info(
                    "vae decoder step %d/%d: reconstruction loss %.4f",
                    step + 1,
                    settings.decoder_steps,
                    sum(losses[-50:]) / len(losses[-50:]),
                )
        vae.eval()
    for parameter in frozen:
        parameter.requires_grad_(True)
    return {"losses": losses, "seconds": time.perf_counter() - start}


def save_vae(vae: AutoencoderKL, folder: Path) -> None:
    """Write ``vae`` as a diffusers AutoencoderKL folder (config.json + safetensors), atomically."""
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)


def reconstruction_error(vae: AutoencoderKL, images: Sequence[torch.Tensor]) -> float:
    """Mean absolute error in [0, 255] pixel units of the VAE's deterministic round trip over ``images``."""
    errors = []
    with torch.no_grad():
        for image in images:
            image = _whole(image)
            decoded = vae.decode(vae.encode(image[None]).latent_dist.mode()).sample.clamp(-1, 1)
            errors.append((decoded[0] - image).abs().mean().item() * 127.5)
    return sum(errors) / len(errors)
