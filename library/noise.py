"""Noise, timesteps and targets for one diffusion training step, with sd-scripts' semantics.

Every random draw comes from an explicit ``torch.Generator`` (never the global RNG), in the same order as
sd-scripts' ``get_noise_noisy_latents_and_timesteps``, so a run resumed from saved generator state is step-exact.
Draws happen on the generator's device and are moved to the latents' device, so a CPU generator gives the same
numbers whether training runs on CPU or GPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.errors import UserError

logger = logging.getLogger(__name__)

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "sigmoid", "heavy_tail", "cos_map")
HEAVY_TAIL_MAX = 2 / (math.pi - 2)  # heavy_tail's mapping stays monotonic for -1 <= noising_weight <= 2 / (pi - 2)


@dataclass(frozen=True)
class NoiseSettings:
    """How noise and timesteps are drawn. Field names are the flags' names (``settings_from_flags`` reads them);
    ``v_parameterization`` is the loaded model's, given by the caller.

    The timestep range is sd-scripts' ``min/max_timestep`` or OneTrainer's ``min/max_noising_strength`` (fractions
    of the schedule), never both; ``timestep_distribution`` with ``noising_weight``/``noising_bias`` (OneTrainer's
    meanings) shapes the draw within it."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    zero_terminal_snr: bool = False
    timestep_distribution: str = "uniform"
    min_noising_strength: float | None = None
    max_noising_strength: float | None = None
    noising_weight: float = 0.0
    noising_bias: float = 0.0
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        self._check_distribution()
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise UserError(
                "--adaptive_noise_scale needs --noise_offset: add --noise_offset (e.g. 0.05) "
                "or drop --adaptive_noise_scale"
            )
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise UserError(
                f"--multires_noise_iterations is {self.multires_noise_iterations}: use a count >= 0 (6-10 is typical)"
            )
        if self.min_timestep is not None and self.min_timestep < 0:
            raise UserError(f"--min_timestep is {self.min_timestep}: use a value from 0 to 999")
        if self.max_timestep is not None and self.max_timestep < 1:
            raise UserError(f"--max_timestep is {self.max_timestep}: use a value from 1 to 1000")
        if self.min_timestep is not None and self.max_timestep is not None and self.min_timestep > self.max_timestep:
            raise UserError(
                f"--min_timestep {self.min_timestep} is above --max_timestep {self.max_timestep}: "
                "make min_timestep <= max_timestep"
            )
        if self.zero_terminal_snr and not self.v_parameterization:
            logger.warning("--zero_terminal_snr without --v_parameterization: the last timestep has no signal to learn")

    def _check_distribution(self) -> None:
        if self.timestep_distribution not in TIMESTEP_DISTRIBUTIONS:
            raise UserError(
                f"--timestep_distribution {self.timestep_distribution!r} is unknown: "
                f"use one of {', '.join(TIMESTEP_DISTRIBUTIONS)}"
            )
        strengths = self.min_noising_strength is not None or self.max_noising_strength is not None
        if strengths and (self.min_timestep is not None or self.max_timestep is not None):
            raise UserError(
                "--min/max_noising_strength and --min/max_timestep both set the timestep range: keep one pair"
            )
        low, high = self.noising_range
        if not 0 <= low < high <= 1:
            raise UserError(f"--min_noising_strength {low} and --max_noising_strength {high}: use 0 <= min < max <= 1")
        if self.timestep_distribution == "heavy_tail" and not -1 <= self.noising_weight <= HEAVY_TAIL_MAX:
            raise UserError(
                f"--noising_weight {self.noising_weight} with --timestep_distribution heavy_tail: use a value from -1 "
                f"to {HEAVY_TAIL_MAX:.4f} (outside it the mapping is not monotonic)"
            )
        if self.timestep_distribution == "logit_normal" and self.noising_weight <= -1:
            raise UserError(
                f"--noising_weight {self.noising_weight} with --timestep_distribution logit_normal: the spread is "
                "noising_weight + 1, so use a value above -1"
            )
        unused = [
            flag
            for flag, value, users in (
                ("--noising_weight", self.noising_weight, ("logit_normal", "sigmoid", "heavy_tail")),
                ("--noising_bias", self.noising_bias, ("logit_normal", "sigmoid")),
            )
            if value != 0 and self.timestep_distribution not in users
        ]
        if unused:
            logger.warning(
                "%s has no effect with --timestep_distribution %s", " and ".join(unused), self.timestep_distribution
            )

    @property
    def noising_range(self) -> tuple[float, float]:
        """``(min_noising_strength, max_noising_strength)`` with their defaults 0 and 1."""
        low = 0.0 if self.min_noising_strength is None else self.min_noising_strength
        high = 1.0 if self.max_noising_strength is None else self.max_noising_strength
        return low, high


class NoisedBatch(NamedTuple):
    """What the training step needs after noising: model input, the noise drawn, timesteps and the loss target."""

    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, returned on ``like``'s device and dtype."""
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return sample.to(device=like.device, dtype=like.dtype)


def _rand_scalar(generator: torch.Generator) -> float:
    """One uniform draw in [0, 1) from the generator."""
    return float(torch.rand((), generator=generator, device=generator.device, dtype=torch.float32))


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a beta schedule so the last timestep has zero SNR (arXiv 2305.08891, as sd-scripts does it)."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def training_scheduler(scheduler: DDPMScheduler, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """A fresh DDPM scheduler for training from ``scheduler``'s config, with zero-terminal-SNR betas if asked.

    The given scheduler is left untouched (it may also drive sampling).
    """
    fresh = DDPMScheduler.from_config(scheduler.config)
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(fresh.betas)
        alphas = 1.0 - betas
        fresh.betas = betas
        fresh.alphas = alphas
        fresh.alphas_cumprod = torch.cumprod(alphas, dim=0)
    return fresh


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float | torch.Tensor,
    adaptive_noise_scale: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (crosslabs' offset noise).

    With ``adaptive_noise_scale`` the offset grows by that factor times the absolute channel mean of the latents,
    clamped at zero.
    """
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, min=0.0)
    return noise + noise_offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise: add bilinearly upsampled noise at random 2x-4x coarser scales, then renormalise.

    Level ``i`` has size ``dim / r**i`` with ``r`` uniform in [2, 4) and weight ``discount**i``; it stops after
    the first level that reaches a 1-pixel side. The result is divided by its standard deviation over the batch.
    """
    batch, channels, height, width = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = _rand_scalar(generator) * 2 + 2
        small_h, small_w = max(1, int(height / (r**i))), max(1, int(width / (r**i)))
        coarse = _randn((batch, channels, small_h, small_w), generator, noise)
        out = out + F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**i
        if small_h == 1 or small_w == 1:
            break
    return out / out.std()


def timestep_bounds(settings: NoiseSettings, num_train_timesteps: int) -> tuple[int, int]:
    """The half-open range ``[low, high)`` timesteps are drawn from; ``low == high`` means always ``high``.

    Noising strengths give ``[int(T * min), int(T * max))`` as in OneTrainer."""
    if settings.min_noising_strength is not None or settings.max_noising_strength is not None:
        fraction_low, fraction_high = settings.noising_range
        low, high = int(num_train_timesteps * fraction_low), int(num_train_timesteps * fraction_high)
        if low >= high:
            raise UserError(
                f"--min_noising_strength {fraction_low} and --max_noising_strength {fraction_high} leave no timestep "
                f"of the scheduler's {num_train_timesteps}: widen the range"
            )
        return low, high
    low = 0 if settings.min_timestep is None else settings.min_timestep
    high = num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    if high > num_train_timesteps:
        raise UserError(
            f"--max_timestep {high} is beyond the scheduler's {num_train_timesteps} timesteps: "
            f"use at most {num_train_timesteps}"
        )
    if low >= num_train_timesteps:
        raise UserError(f"--min_timestep {low} must be below {num_train_timesteps}")
    if low == high == num_train_timesteps:
        raise UserError(f"--min_timestep and --max_timestep are both {high}: the last timestep is {high - 1}")
    return low, high


def sample_timesteps(low: int, high: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in ``[low, high)`` (all equal to ``high`` when ``low >= high``), on the CPU."""
    if low < high:
        return torch.randint(low, high, (batch_size,), generator=generator, device=generator.device).long().cpu()
    return torch.full((batch_size,), high, dtype=torch.long)


def timestep_weights(distribution: str, count: int, weight: float, bias: float) -> torch.Tensor:
    """OneTrainer's unnormalised probabilities of the ``count`` timesteps of a range, at ``x = linspace(0, 1)``:
    sigmoid ``1 / (1 + exp(-weight * (x - bias - 0.5)))``, cos_map ``2 / (pi - 2 pi x + 2 pi x^2)``."""
    x = torch.linspace(0, 1, count)
    if distribution == "sigmoid":
        return 1 / (1 + torch.exp(-weight * (x - (bias + 0.5))))
    if distribution == "cos_map":
        return 2.0 / (math.pi - 2.0 * math.pi * x + 2.0 * math.pi * x**2.0)
    raise ValueError(f"{distribution} is not a discrete timestep distribution")


def draw_timesteps(
    settings: NoiseSettings, low: int, high: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Timesteps in ``[low, high)`` from ``settings.timestep_distribution`` (OneTrainer's formulas), on the CPU.

    uniform is :func:`sample_timesteps` (today's draw). logit_normal: ``sigmoid(N(bias, weight + 1))``; heavy_tail:
    ``1 - u - weight * (cos^2(pi u / 2) - 1 + u)`` for uniform ``u``; each maps ``[0, 1)`` onto the range,
    truncated (and kept below ``high`` where a draw rounds to 1). sigmoid and cos_map draw indices with
    :func:`timestep_weights`.
    """
    distribution = settings.timestep_distribution
    if distribution == "uniform" or low >= high:
        return sample_timesteps(low, high, batch_size, generator)
    count, device = high - low, generator.device
    if distribution in ("sigmoid", "cos_map"):
        weights = timestep_weights(distribution, count, settings.noising_weight, settings.noising_bias)
        if not bool(weights.sum() > 0):
            raise UserError(
                f"--timestep_distribution {distribution} with --noising_weight {settings.noising_weight} and "
                f"--noising_bias {settings.noising_bias} gives every timestep weight 0: bring the bias nearer 0"
            )
        picked = torch.multinomial(weights.to(device), batch_size, replacement=True, generator=generator)
        return (picked.cpu() + low).long()
    if distribution == "logit_normal":
        normal = torch.normal(
            settings.noising_bias, settings.noising_weight + 1.0, (batch_size,), generator=generator, device=device
        )
        fraction = normal.sigmoid()
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
        fraction = 1.0 - u - settings.noising_weight * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)
    timesteps = (fraction.cpu() * count + low).long()
    return timesteps.clamp(low, high - 1)


def training_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    v_parameterization: bool,
) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon), or the velocity for v-parameterization."""
    if not v_parameterization:
        return noise
    alphas_cumprod = scheduler.alphas_cumprod
    try:
        return scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
    finally:
        scheduler.alphas_cumprod = alphas_cumprod


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The forward diffusion step ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``, leaving the scheduler as it was."""
    alphas_cumprod = scheduler.alphas_cumprod
    try:
        return scheduler.add_noise(latents, noise, timesteps.to(latents.device))
    finally:
        scheduler.alphas_cumprod = alphas_cumprod


def noise_and_timesteps(
    latents: torch.Tensor, scheduler: DDPMScheduler, settings: NoiseSettings, generator: torch.Generator
) -> NoisedBatch:
    """Draw noise and timesteps for a batch of latents and noise them, as sd-scripts does.

    Draw order (fixed, so resume is exact): base noise; noise-offset strength (if random) and offset; pyramid
    levels; timesteps; input-perturbation strength (if random) and noise. The target uses the noise before
    input perturbation, as in sd-scripts. ``scheduler`` should come from :func:`training_scheduler`.
    """
    noise = _randn(tuple(latents.shape), generator, latents)
    if settings.noise_offset:
        offset: float | torch.Tensor = settings.noise_offset
        if settings.noise_offset_random_strength:
            offset = _rand_scalar(generator) * settings.noise_offset
        noise = offset_noise(latents, noise, offset, settings.adaptive_noise_scale, generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount, generator)

    low, high = timestep_bounds(settings, scheduler.config.num_train_timesteps)
    timesteps = draw_timesteps(settings, low, high, latents.shape[0], generator).to(latents.device)

    noise_in = noise
    if settings.ip_noise_gamma:
        strength = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            strength = _rand_scalar(generator) * settings.ip_noise_gamma
        noise_in = noise + strength * _randn(tuple(latents.shape), generator, latents)
    noisy_latents = add_noise(scheduler, latents, noise_in, timesteps)
    target = training_target(latents, noise, timesteps, scheduler, settings.v_parameterization)
    return NoisedBatch(noisy_latents=noisy_latents, noise=noise, timesteps=timesteps, target=target)
