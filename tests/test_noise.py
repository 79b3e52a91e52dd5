"""Noise, timesteps and targets: each formula against hand values or a replay of the same generator draws."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.config.settings import settings_from_flags
from library.config.train_flags import add_noise_arguments
from library.errors import UserError
from library.models.tiny import sd_scheduler
from library.noise import (
    NoiseSettings,
    noise_and_timesteps,
    offset_noise,
    pyramid_noise,
    sample_timesteps,
    timestep_bounds,
    training_scheduler,
    training_target,
    zero_terminal_snr_betas,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_alphas_cumprod_by_hand() -> list[float]:
    """SD's scaled_linear schedule in double precision, independent of diffusers."""
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    product, out = 1.0, []
    for i in range(1000):
        product *= 1 - (start + (end - start) * i / 999) ** 2
        out.append(product)
    return out


def test_zero_terminal_snr_betas_by_hand():
    # alphas_bar = [0.9, 0.72, 0.504]; sqrt shifted so the last is 0 and scaled so the first stays sqrt(0.9)
    betas = zero_terminal_snr_betas(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert betas.tolist() == pytest.approx([0.1, 0.6630098949578507, 1.0], abs=1e-12)


def test_training_scheduler_zero_terminal_snr_leaves_original_untouched():
    original = sd_scheduler()
    before = original.alphas_cumprod.clone()
    fixed = training_scheduler(original, zero_terminal_snr=True)
    assert torch.equal(original.alphas_cumprod, before)
    assert fixed.alphas_cumprod[-1].item() == 0.0
    assert fixed.betas[-1].item() == pytest.approx(1.0)
    assert fixed.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert torch.equal(fixed.alphas_cumprod, torch.cumprod(1 - fixed.betas, 0))
    plain = training_scheduler(original)
    assert torch.equal(plain.alphas_cumprod, before) and plain is not original


def test_offset_noise_is_noise_plus_offset_times_channel_normal():
    latents = torch.zeros(2, 4, 3, 3)
    noise = torch.zeros(2, 4, 3, 3)
    out = offset_noise(latents, noise, 0.1, None, gen(1))
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=gen(1))
    assert torch.equal(out, expected.expand(2, 4, 3, 3))


def test_adaptive_noise_scale_uses_abs_channel_mean_and_clamps_at_zero():
    latents = torch.tensor([-2.0, 1.0, 0.0, 3.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    noise = torch.zeros(1, 4, 2, 2)
    z = torch.randn((1, 4, 1, 1), generator=gen(2)).view(4)
    grown = offset_noise(latents, noise, 0.1, 0.05, gen(2))[0, :, 0, 0]
    assert torch.allclose(grown, torch.tensor([0.2, 0.15, 0.1, 0.25]) * z)
    shrunk = offset_noise(latents, noise, 0.1, -0.1, gen(2))[0, :, 0, 0]  # 0.1 - 0.1*|mean| -> [-0.1, 0, 0.1, -0.2]
    assert torch.allclose(shrunk, torch.tensor([0.0, 0.0, 0.1, 0.0]) * z)


def test_pyramid_noise_stops_at_one_pixel_and_renormalises():
    base = torch.randn(1, 1, 4, 4, generator=gen(3))
    used = gen(4)
    out = pyramid_noise(base, iterations=5, discount=0.3, generator=used)
    # replay: level 0 is full size (r**0 == 1); level 1 has side int(4 / r) == 1 for r in (2, 4), so it stops there
    replay = gen(4)
    torch.rand((), generator=replay)
    level0 = torch.randn((1, 1, 4, 4), generator=replay)
    torch.rand((), generator=replay)
    level1 = torch.randn((1, 1, 1, 1), generator=replay)
    summed = base + level0 + 0.3 * level1  # a 1x1 level upsamples to a constant
    assert torch.allclose(out, summed / summed.std(), atol=1e-6)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(used.get_state(), replay.get_state())  # no draws after the 1-pixel level


def test_pyramid_noise_bilinear_levels_match_replay():
    base = torch.randn(2, 3, 16, 16, generator=gen(5))
    out = pyramid_noise(base, iterations=2, discount=0.5, generator=gen(6))
    replay = gen(6)
    summed = base.clone()
    for i in range(2):
        r = float(torch.rand((), generator=replay)) * 2 + 2
        h = w = max(1, int(16 / r**i))
        coarse = torch.randn((2, 3, h, w), generator=replay)
        summed = summed + F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) * 0.5**i
    assert torch.allclose(out, summed / summed.std(), atol=1e-6)


def test_timestep_bounds_and_sampling():
    assert timestep_bounds(NoiseSettings(), 1000) == (0, 1000)
    assert timestep_bounds(NoiseSettings(min_timestep=100, max_timestep=200), 1000) == (100, 200)
    with pytest.raises(UserError, match="--max_timestep"):
        timestep_bounds(NoiseSettings(max_timestep=1001), 1000)
    with pytest.raises(UserError, match="--min_timestep"):
        NoiseSettings(min_timestep=500, max_timestep=400)
    drawn = sample_timesteps(100, 200, 64, gen(7))
    assert torch.equal(drawn, torch.randint(100, 200, (64,), generator=gen(7)))
    assert drawn.dtype == torch.long and int(drawn.min()) >= 100 and int(drawn.max()) < 200
    assert sample_timesteps(300, 300, 3, gen(7)).tolist() == [300, 300, 300]


def test_noise_and_timesteps_epsilon_replays_sd_scripts_draw_order():
    scheduler = training_scheduler(sd_scheduler())
    latents = torch.randn(2, 4, 4, 4, generator=gen(8))
    settings = NoiseSettings(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.02,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        min_timestep=10,
        max_timestep=990,
    )
    batch = noise_and_timesteps(latents, scheduler, settings, gen(9))

    replay = gen(9)
    noise = torch.randn((2, 4, 4, 4), generator=replay)
    strength = float(torch.rand((), generator=replay)) * 0.1
    offset = strength + 0.02 * latents.mean(dim=(2, 3), keepdim=True).abs()
    noise = noise + offset * torch.randn((2, 4, 1, 1), generator=replay)
    timesteps = torch.randint(10, 990, (2,), generator=replay)
    ip_strength = float(torch.rand((), generator=replay)) * 0.1
    perturbed = noise + ip_strength * torch.randn((2, 4, 4, 4), generator=replay)

    alphas_cumprod = sd_alphas_cumprod_by_hand()
    a = torch.tensor([alphas_cumprod[t] for t in timesteps.tolist()], dtype=torch.float32).view(2, 1, 1, 1)
    assert torch.equal(batch.timesteps, timesteps)
    assert torch.allclose(batch.noise, noise, atol=1e-6)
    assert torch.allclose(batch.noisy_latents, a.sqrt() * latents + (1 - a).sqrt() * perturbed, atol=1e-5)
    assert torch.equal(batch.target, batch.noise)  # epsilon target is the noise before input perturbation


def test_noise_and_timesteps_v_target_and_determinism():
    scheduler = training_scheduler(sd_scheduler(v_parameterization=True))
    latents = torch.randn(3, 4, 4, 4, generator=gen(10))
    settings = NoiseSettings(v_parameterization=True, multires_noise_iterations=3)
    first = noise_and_timesteps(latents, scheduler, settings, gen(11))
    again = noise_and_timesteps(latents, scheduler, settings, gen(11))
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    alphas_cumprod = sd_alphas_cumprod_by_hand()
    a = torch.tensor([alphas_cumprod[t] for t in first.timesteps.tolist()], dtype=torch.float32).view(3, 1, 1, 1)
    assert torch.allclose(first.target, a.sqrt() * first.noise - (1 - a).sqrt() * latents, atol=1e-5)
    assert torch.allclose(first.noisy_latents, a.sqrt() * latents + (1 - a).sqrt() * first.noise, atol=1e-5)
    assert scheduler.alphas_cumprod.device.type == "cpu"


def test_training_target_epsilon_is_noise_object():
    scheduler = DDPMScheduler(num_train_timesteps=4, trained_betas=[0.2, 0.5, 0.75, 0.9])
    latents, noise = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    assert training_target(latents, noise, torch.tensor([1]), scheduler, False) is noise
    # alphas_cumprod[1] = 0.8 * 0.5 = 0.4: v = sqrt(0.4) * 2 - sqrt(0.6) * 1
    v = training_target(latents, noise, torch.tensor([1]), scheduler, True)
    assert v.item() == pytest.approx(math.sqrt(0.4) * 2 - math.sqrt(0.6), abs=1e-6)


def test_settings_from_flags_and_validation():
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    parser.add_argument("--v_parameterization", action="store_true")
    defaults = settings_from_flags(NoiseSettings, parser.parse_args([]))
    assert defaults == NoiseSettings()
    assert defaults.multires_noise_discount == 0.3
    args = parser.parse_args(
        ["--noise_offset", "0.05", "--adaptive_noise_scale", "0.01", "--min_timestep", "5", "--zero_terminal_snr"]
    )
    settings = settings_from_flags(NoiseSettings, args)
    assert (settings.noise_offset, settings.adaptive_noise_scale, settings.min_timestep) == (0.05, 0.01, 5)
    assert settings.zero_terminal_snr
    with pytest.raises(UserError, match="--adaptive_noise_scale needs --noise_offset"):
        settings_from_flags(NoiseSettings, parser.parse_args(["--adaptive_noise_scale", "0.01"]))
