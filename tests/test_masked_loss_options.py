"""Masked training: zero gradient where the mask is zero (autograd), --unmasked_weight and
--normalize_masked_area_loss by their exact factors, --unmasked_probability's draw from the step's generator."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler

from library.losses import LossSettings, per_sample_loss

T = torch.tensor([0, 1])


@pytest.fixture(scope="module")
def schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=4, trained_betas=[0.2, 0.5, 0.75, 0.9])


def half_mask() -> torch.Tensor:
    """(2, 1, 4, 4): sample 0 keeps its left quarter (4 of 16 pixels), sample 1 its top half."""
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, :1] = 1
    mask[1, :, :2, :] = 1
    return mask


@pytest.mark.parametrize(
    "settings",
    [
        LossSettings(masked_loss=True),
        LossSettings(masked_loss=True, normalize_masked_area_loss=True, min_snr_gamma=1.0),
        LossSettings(masked_loss=True, mse_strength=1, mae_strength=0.5, log_cosh_strength=2, huber_strength=1),
    ],
)
def test_zero_gradient_where_mask_is_zero(schedule, settings):
    pred = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = half_mask()
    per_sample_loss(pred, target, T, schedule, settings, mask=mask).mean().backward()
    outside = (mask == 0).expand_as(pred)
    assert torch.count_nonzero(pred.grad[outside]) == 0
    assert bool((pred.grad[~outside] != 0).all())


def test_unmasked_weight_gives_gradient_outside_the_mask(schedule):
    pred = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.zeros(2, 4, 4, 4)
    settings = LossSettings(masked_loss=True, unmasked_weight=0.25)
    per_sample_loss(pred, target, T, schedule, settings, mask=half_mask()).mean().backward()
    # d/dpred of mean(w' * pred^2) / 2 over the batch = w' * pred / (2 * 64 / 2)
    weight = (0.25 + 0.75 * half_mask()).expand_as(pred)
    assert torch.allclose(pred.grad, weight * pred.detach() / 64, atol=1e-7)


def test_unmasked_weight_and_normalize_by_their_exact_factors(schedule):
    pred = torch.full((2, 4, 4, 4), 2.0)  # every element loss is 4 (l2)
    target = torch.zeros(2, 4, 4, 4)
    mask = half_mask()  # mask means 0.25 and 0.5

    def loss(**options) -> list[float]:
        return per_sample_loss(pred, target, T, schedule, LossSettings(masked_loss=True, **options), mask=mask).tolist()

    assert loss() == [4 * 0.25, 4 * 0.5]
    # mask' = w + (1 - w) mask: its mean is 0.5 + 0.5 * 0.25 and 0.5 + 0.5 * 0.5
    assert loss(unmasked_weight=0.5) == pytest.approx([4 * 0.625, 4 * 0.75])
    # normalised: divided by the mean of the mask actually applied, so a constant loss comes back whole
    assert loss(normalize_masked_area_loss=True) == pytest.approx([4.0, 4.0])
    assert loss(unmasked_weight=0.5, normalize_masked_area_loss=True) == pytest.approx([4.0, 4.0])
    # a non-constant loss: mean(l * m) / mean(m)
    pred2 = torch.arange(128, dtype=torch.float32).view(2, 4, 4, 4) / 64
    settings = LossSettings(masked_loss=True, unmasked_weight=0.2, normalize_masked_area_loss=True)
    got = per_sample_loss(pred2, target, T, schedule, settings, mask=mask)
    applied = 0.2 + 0.8 * mask
    expected = (pred2**2 * applied).mean(dim=(1, 2, 3)) / applied.mean(dim=(1, 2, 3))
    assert torch.allclose(got, expected)
    # an all-black mask normalises to 0, not NaN
    black = per_sample_loss(
        pred, target, T, schedule, LossSettings(normalize_masked_area_loss=True), mask=torch.zeros(2, 1, 4, 4)
    )
    assert black.tolist() == [0.0, 0.0]


def test_unmasked_probability_draw_is_reproducible(schedule):
    batch = 8
    pred = torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    target = torch.zeros(batch, 4, 4, 4)
    mask = torch.zeros(batch, 1, 4, 4)
    mask[:, :, :2] = 1
    timesteps = torch.zeros(batch, dtype=torch.long)
    settings = LossSettings(masked_loss=True, unmasked_probability=0.5)
    got = per_sample_loss(
        pred, target, timesteps, schedule, settings, mask=mask, generator=torch.Generator().manual_seed(3)
    )
    again = per_sample_loss(
        pred, target, timesteps, schedule, settings, mask=mask, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(got, again)

    unmasked = torch.rand(batch, generator=torch.Generator().manual_seed(3)) < 0.5
    full = (pred**2).mean(dim=(1, 2, 3))
    masked = (pred**2 * mask).mean(dim=(1, 2, 3))
    assert 0 < int(unmasked.sum()) < batch
    assert torch.allclose(got, torch.where(unmasked, full, masked))

    # probability 0 draws nothing: the generator is left as it was
    generator = torch.Generator().manual_seed(4)
    per_sample_loss(pred, target, timesteps, schedule, LossSettings(masked_loss=True), mask=mask, generator=generator)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(4)))
    # probability 1: every sample unmasked
    everyone = per_sample_loss(
        pred, target, timesteps, schedule, LossSettings(unmasked_probability=1.0), mask=mask, generator=generator
    )
    assert torch.allclose(everyone, full)


def test_options_without_a_mask_source_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="library.losses"):
        LossSettings(unmasked_weight=0.1, normalize_masked_area_loss=True)
    assert len(caplog.records) == 1
    assert "--unmasked_weight, --normalize_masked_area_loss: only masked samples are affected" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.losses"):
        LossSettings(unmasked_weight=0.1, alpha_mask=True)
        LossSettings(unmasked_probability=0.1, masked_loss=True)
    assert not caplog.records
