"""Loss formulas against hand computations on a 4-step schedule with alphas_cumprod = [0.8, 0.4, 0.1, 0.01].

With those, SNR = a / (1 - a) = [4, 2/3, 1/9, 1/99], sigma = sqrt((1 - a) / a) = [0.5, 1.2247, 3, 9.9499],
``snr / (snr + 1) = a`` and ``1 / (snr + 1) = 1 - a``.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from diffusers import DDPMScheduler

from library.config.settings import settings_from_flags
from library.config.train_flags import add_loss_arguments
from library.errors import UserError
from library.losses import (
    LossSettings,
    debiased_weight,
    elementwise_loss,
    huber_threshold,
    mask_from_conditioning_image,
    min_snr_weight,
    per_sample_loss,
    resize_mask,
    snr_table,
    v_pred_scale,
)
from library.models.tiny import sd_scheduler
from library.noise import training_scheduler

T = torch.tensor([0, 1, 2, 3])
A = [0.8, 0.4, 0.1, 0.01]


@pytest.fixture
def tiny_schedule() -> DDPMScheduler:
    # betas chosen so alphas = [0.8, 0.5, 0.25, 0.1] and alphas_cumprod = [0.8, 0.4, 0.1, 0.01]
    return DDPMScheduler(num_train_timesteps=4, trained_betas=[0.2, 0.5, 0.75, 0.9])


def close(tensor: torch.Tensor, expected: list[float], tol: float = 1e-5) -> bool:
    return tensor.tolist() == pytest.approx(expected, rel=tol, abs=tol)


def test_snr_table_tiny_and_sd(tiny_schedule):
    assert close(snr_table(tiny_schedule), [4.0, 2 / 3, 1 / 9, 1 / 99])
    sd = snr_table(sd_scheduler())
    # alphas_cumprod[0] = 1 - 0.00085 -> 0.99915 / 0.00085; t=999 computed in double from SD's betas
    assert sd[0].item() == pytest.approx(1175.4706, rel=1e-4)
    assert sd[999].item() == pytest.approx(0.0046819167, rel=1e-4)


def test_min_snr_weights(tiny_schedule):
    # gamma 1: epsilon min(snr, 1) / snr; v min(snr, 1) / (snr + 1)
    assert close(min_snr_weight(T, tiny_schedule, 1.0, v_prediction=False), [0.25, 1.0, 1.0, 1.0])
    assert close(min_snr_weight(T, tiny_schedule, 1.0, v_prediction=True), [0.2, 0.4, 0.1, 0.01])
    # gamma 5 on SD at t=0: 5 / 1175.47 and 5 / 1176.47
    sd = sd_scheduler()
    assert min_snr_weight(torch.tensor([0]), sd, 5.0, False).item() == pytest.approx(5 / 1175.4706, rel=1e-4)
    assert min_snr_weight(torch.tensor([0]), sd, 5.0, True).item() == pytest.approx(5 / 1176.4706, rel=1e-4)


def test_min_snr_epsilon_weight_is_one_at_zero_snr():
    ztsnr = training_scheduler(sd_scheduler(), zero_terminal_snr=True)
    weight = min_snr_weight(torch.tensor([999]), ztsnr, 5.0, False)
    assert weight.tolist() == [1.0]


def test_v_pred_scale_and_debiased_weights(tiny_schedule):
    assert close(v_pred_scale(T, tiny_schedule), A)
    assert close(debiased_weight(T, tiny_schedule, v_prediction=False), [0.5, 1.2247449, 3.0, 9.9498744])
    assert close(debiased_weight(T, tiny_schedule, v_prediction=True), [0.2, 0.6, 0.9, 0.99])
    sd = sd_scheduler()  # SNR at t=0 is 1175, capped at 1000
    assert v_pred_scale(torch.tensor([0]), sd).item() == pytest.approx(1000 / 1001, rel=1e-6)
    assert debiased_weight(torch.tensor([0]), sd, False).item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)


def test_huber_thresholds(tiny_schedule):
    constant = LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.1, huber_scale=2.0)
    assert close(huber_threshold(constant, T, tiny_schedule), [0.2] * 4)
    exponential = LossSettings(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    # 2 * exp(ln(0.1) * t / 4)
    assert close(huber_threshold(exponential, T, tiny_schedule), [2.0, 1.1246827, 0.6324555, 0.3556559])
    snr = LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=2.0)
    # 0.9 / (1 + sigma)^2 + 0.1, scale unused
    assert close(huber_threshold(snr, T, tiny_schedule), [0.5, 0.2818369, 0.15625, 0.1075063])
    assert huber_threshold(LossSettings(loss_type="l2"), T, tiny_schedule) is None


def test_elementwise_losses():
    pred = torch.tensor([0.0, 1.0, -3.0]).view(3, 1, 1, 1)
    target = torch.zeros(3, 1, 1, 1)
    c = torch.full((3,), 0.5)
    assert close(elementwise_loss(pred, target, "l2").flatten(), [0.0, 1.0, 9.0])
    assert close(elementwise_loss(pred, target, "l1").flatten(), [0.0, 1.0, 3.0])
    # huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c)
    assert close(elementwise_loss(pred, target, "huber", c).flatten(), [0.0, 0.6180340, 2.5413813])
    assert close(elementwise_loss(pred, target, "smooth_l1", c).flatten(), [0.0, 1.2360680, 5.0827625])


def test_mask_is_area_resized_to_loss():
    mask = torch.tensor(
        [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]
    ).unsqueeze(0)
    loss = torch.ones(1, 2, 2, 2)
    masked = loss * resize_mask(mask, loss)
    assert close(masked[0, 0].flatten(), [1.0, 0.25, 0.0, 0.75])
    assert torch.equal(masked[0, 0], masked[0, 1])
    assert torch.equal(loss * resize_mask(mask.unsqueeze(1), loss), masked)
    image = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert mask_from_conditioning_image(image).flatten().tolist() == [0.0] * 4  # red channel -1 -> 0


def test_per_sample_loss_l2_with_weights_mask_and_min_snr(tiny_schedule):
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]]).view(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    # per-sample mse means: (1+4+9+16)/4 = 7.5 and 4/4 = 1; mask keeps the left column of sample 0 only
    settings = LossSettings(min_snr_gamma=1.0)
    loss = per_sample_loss(pred, target, torch.tensor([0, 1]), tiny_schedule, settings, torch.tensor([1.0, 0.5]))
    assert close(loss, [7.5 * 1.0 * 0.25, 1.0 * 0.5 * 1.0])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    masked = per_sample_loss(pred, target, torch.tensor([0, 1]), tiny_schedule, LossSettings(), mask=mask)
    assert close(masked, [(1 + 9) / 4, 1.0])


def test_v_parameterization_chain_order(tiny_schedule):
    pred, target = torch.ones(4, 1, 1, 1), torch.zeros(4, 1, 1, 1)
    settings = LossSettings(
        min_snr_gamma=1.0,
        scale_v_pred_loss_like_noise_pred=True,
        debiased_estimation_loss=True,
        v_parameterization=True,
    )
    # (min(snr,1)/(snr+1)) * a * (1 - a)
    expected = [w * a * (1 - a) for w, a in zip([0.2, 0.4, 0.1, 0.01], A)]
    assert close(per_sample_loss(pred, target, T, tiny_schedule, settings), expected)


def test_v_pred_like_loss_and_huber_loss(tiny_schedule):
    pred, target = torch.ones(4, 1, 1, 1), torch.zeros(4, 1, 1, 1)
    settings = LossSettings(v_pred_like_loss=0.5)
    assert close(per_sample_loss(pred, target, T, tiny_schedule, settings), [1 + 0.5 / a for a in A])
    debiased = LossSettings(debiased_estimation_loss=True)
    assert close(per_sample_loss(pred, target, T, tiny_schedule, debiased), [0.5, 1.2247449, 3.0, 9.9498744])
    huber = LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.5)
    assert close(per_sample_loss(pred, target, T, tiny_schedule, huber), [0.6180340] * 4)


def test_loss_settings_from_flags_and_validation():
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    parser.add_argument("--v_parameterization", action="store_true")
    defaults = settings_from_flags(LossSettings, parser.parse_args([]))
    assert defaults == LossSettings()
    assert (defaults.loss_type, defaults.huber_schedule, defaults.huber_c, defaults.huber_scale) == (
        "l2",
        "snr",
        0.1,
        1.0,
    )
    args = parser.parse_args(["--loss_type", "huber", "--min_snr_gamma", "5", "--masked_loss", "--v_parameterization"])
    settings = settings_from_flags(LossSettings, args)
    assert (settings.loss_type, settings.min_snr_gamma, settings.masked_loss, settings.v_parameterization) == (
        "huber",
        5.0,
        True,
        True,
    )
    with pytest.raises(UserError, match="--scale_v_pred_loss_like_noise_pred"):
        settings_from_flags(LossSettings, parser.parse_args(["--scale_v_pred_loss_like_noise_pred"]))
    with pytest.raises(UserError, match="--v_pred_like_loss"):
        settings_from_flags(LossSettings, parser.parse_args(["--v_pred_like_loss", "0.1", "--v_parameterization"]))
    with pytest.raises(UserError, match="--loss_type"):
        LossSettings(loss_type="l3")
