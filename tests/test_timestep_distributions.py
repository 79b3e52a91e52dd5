"""--timestep_distribution (OneTrainer's formulas), --min/max_noising_strength and --noising_weight/bias: a few
draws replayed from the same seed through the formula written out here, and the shape of many draws against the
distribution's own CDF or mean."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.config.settings import settings_from_flags
from library.config.train_flags import add_noise_arguments
from library.errors import UserError
from library.models.tiny import sd_scheduler
from library.noise import NoiseSettings, draw_timesteps, noise_and_timesteps, timestep_bounds, timestep_weights

MANY = 20000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fraction_below(draws: torch.Tensor, value: float) -> float:
    return float((draws < value).float().mean())


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_uniform_is_todays_randint():
    settings = NoiseSettings(timestep_distribution="uniform")
    assert torch.equal(draw_timesteps(settings, 10, 990, 32, gen(1)), torch.randint(10, 990, (32,), generator=gen(1)))


def test_noising_strengths_give_the_range():
    assert timestep_bounds(NoiseSettings(min_noising_strength=0.25, max_noising_strength=0.755), 1000) == (250, 755)
    assert timestep_bounds(NoiseSettings(min_noising_strength=0.5), 1000) == (500, 1000)
    assert timestep_bounds(NoiseSettings(max_noising_strength=0.1), 1000) == (0, 100)
    with pytest.raises(UserError, match="keep one pair"):
        NoiseSettings(min_noising_strength=0.1, max_timestep=900)
    with pytest.raises(UserError, match="min < max"):
        NoiseSettings(min_noising_strength=0.6, max_noising_strength=0.6)
    with pytest.raises(UserError, match="leave no timestep"):
        timestep_bounds(NoiseSettings(min_noising_strength=0.1, max_noising_strength=0.2), 4)


def test_logit_normal_draws_and_shape():
    settings = NoiseSettings(timestep_distribution="logit_normal", noising_weight=0.5, noising_bias=-0.3)
    drawn = draw_timesteps(settings, 100, 900, 32, gen(2))
    normal = torch.normal(-0.3, 1.5, (32,), generator=gen(2))
    assert torch.allclose(normal, -0.3 + 1.5 * torch.randn(32, generator=gen(2)))
    assert drawn.tolist() == [int(sigmoid(z) * 800 + 100) for z in normal.tolist()]

    many = draw_timesteps(NoiseSettings(timestep_distribution="logit_normal"), 0, 1000, MANY, gen(3))
    # P(t < 1000 x) = Phi(logit(x)) for a standard logit-normal
    for x in (0.1, 0.269, 0.5, 0.8):
        cdf = 0.5 * (1 + math.erf(math.log(x / (1 - x)) / math.sqrt(2)))
        assert fraction_below(many, 1000 * x) == pytest.approx(cdf, abs=0.012)
    # a draw whose sigmoid rounds to 1 stays inside the range
    saturated = NoiseSettings(timestep_distribution="logit_normal", noising_bias=60)
    assert draw_timesteps(saturated, 0, 1000, 4, gen(4)).tolist() == [999] * 4


def heavy_tail(u: float, s: float) -> float:
    return 1 - u - s * (math.cos(math.pi / 2 * u) ** 2 - 1 + u)


def test_heavy_tail_draws_and_shape():
    settings = NoiseSettings(timestep_distribution="heavy_tail", noising_weight=1.0)
    drawn = draw_timesteps(settings, 0, 1000, 8, gen(5))
    uniform = torch.rand(8, generator=gen(5)).tolist()
    assert drawn.tolist() == [int(heavy_tail(u, 1.0) * 1000) for u in uniform]

    many = draw_timesteps(settings, 0, 1000, MANY, gen(6))
    for x in (0.1, 0.3, 0.5, 0.9):
        low, high = 0.0, 1.0  # heavy_tail is decreasing in u: P(f(U) < x) = 1 - f^-1(x)
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if heavy_tail(mid, 1.0) > x else (low, mid)
        assert fraction_below(many, 1000 * x) == pytest.approx(1 - low, abs=0.012)
    assert float(many.float().mean()) == pytest.approx(499.5, abs=5)  # E f(U) = 1/2 for every s
    with pytest.raises(UserError, match="heavy_tail"):
        NoiseSettings(timestep_distribution="heavy_tail", noising_weight=2.0)


def test_sigmoid_and_cos_map_weights_and_shape():
    weights = timestep_weights("sigmoid", 5, 8.0, 0.1)
    assert weights.tolist() == pytest.approx([sigmoid(8.0 * (i / 4 - 0.6)) for i in range(5)], rel=1e-6)
    weights = timestep_weights("cos_map", 5, 0.0, 0.0)
    expected = [2 / (math.pi - 2 * math.pi * x + 2 * math.pi * x * x) for x in (0, 0.25, 0.5, 0.75, 1)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)

    for distribution, weight in (("sigmoid", 6.0), ("cos_map", 0.0)):
        settings = NoiseSettings(timestep_distribution=distribution, noising_weight=weight)
        many = draw_timesteps(settings, 200, 600, MANY, gen(7))
        assert int(many.min()) >= 200 and int(many.max()) < 600
        p = timestep_weights(distribution, 400, weight, 0.0).double()
        p = p / p.sum()
        mean = float((p * torch.arange(200, 600, dtype=torch.float64)).sum())
        assert float(many.double().mean()) == pytest.approx(mean, abs=3)
        assert fraction_below(many, 300) == pytest.approx(float(p[:100].sum()), abs=0.012)


def test_draws_follow_the_noise_from_the_same_generator():
    latents = torch.zeros(16, 4, 2, 2)
    settings = NoiseSettings(timestep_distribution="logit_normal", noising_weight=1.0)
    batch = noise_and_timesteps(latents, sd_scheduler(), settings, gen(8))
    replay = gen(8)
    noise = torch.randn((16, 4, 2, 2), generator=replay)
    timesteps = [int(sigmoid(z) * 1000) for z in torch.normal(0.0, 2.0, (16,), generator=replay).tolist()]
    assert torch.equal(batch.noise, noise)
    assert batch.timesteps.tolist() == timesteps
    again = noise_and_timesteps(latents, sd_scheduler(), settings, gen(8))
    assert torch.equal(again.timesteps, batch.timesteps)


def test_flags_and_refusals():
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    args = parser.parse_args(
        "--timestep_distribution sigmoid --min_noising_strength 0.1 --max_noising_strength 0.9 "
        "--noising_weight 3 --noising_bias -0.2".split()
    )
    settings = settings_from_flags(NoiseSettings, args)
    assert (settings.timestep_distribution, settings.noising_range) == ("sigmoid", (0.1, 0.9))
    assert (settings.noising_weight, settings.noising_bias) == (3.0, -0.2)
    assert settings_from_flags(NoiseSettings, parser.parse_args([])) == NoiseSettings()
    for bad in (["--timestep_distribution", "beta"], ["--max_noising_strength", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(UserError, match="unknown"):
        NoiseSettings(timestep_distribution="beta")
    with pytest.raises(UserError, match="above -1"):
        NoiseSettings(timestep_distribution="logit_normal", noising_weight=-1.0)
    with pytest.raises(UserError, match="every timestep weight 0"):
        draw_timesteps(
            NoiseSettings(timestep_distribution="sigmoid", noising_weight=1000, noising_bias=20), 0, 9, 2, gen(0)
        )
