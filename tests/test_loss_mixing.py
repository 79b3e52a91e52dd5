"""Loss mixing (--mse/mae/log_cosh/huber_strength) and P2 weighting against hand computations; the default loss
path against golden values computed before they existed.

The 4-step schedule has alphas_cumprod = [0.8, 0.4, 0.1, 0.01], so SNR = [4, 2/3, 1/9, 1/99].
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
from library.losses import LossSettings, log_cosh_loss, min_snr_weight, p2_weight, per_sample_loss
from library.models.tiny import sd_scheduler
from library.noise import NoiseSettings, noise_and_timesteps, training_scheduler

DIFFS = [0.5, -1.5, 3.0, 0.0, -0.2, 10.0]
SNR = [4.0, 2 / 3, 1 / 9, 1 / 99]


@pytest.fixture(scope="module")
def tiny_schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=4, trained_betas=[0.2, 0.5, 0.75, 0.9])


def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """One sample (1, 1, 2, 3) with pred - target = DIFFS."""
    target = torch.tensor([0.25, -1.0, 2.0, 0.75, 0.1, -3.0]).view(1, 1, 2, 3)
    return target + torch.tensor(DIFFS).view(1, 1, 2, 3), target


def pseudo_huber(d: float, c: float) -> float:
    return 2 * c * (math.sqrt(d * d + c * c) - c)


def loss_of(settings: LossSettings, scheduler: DDPMScheduler, t: int = 0) -> float:
    pred, target = pair()
    return float(per_sample_loss(pred, target, torch.tensor([t]), scheduler, settings)[0])


def test_each_term_alone_is_its_element_loss(tiny_schedule):
    n = len(DIFFS)
    assert loss_of(LossSettings(mse_strength=1.0), tiny_schedule) == pytest.approx(sum(d * d for d in DIFFS) / n)
    assert loss_of(LossSettings(mae_strength=1.0), tiny_schedule) == pytest.approx(sum(abs(d) for d in DIFFS) / n)
    log_cosh = sum(math.log(math.cosh(d)) for d in DIFFS) / n
    assert loss_of(LossSettings(log_cosh_strength=1.0), tiny_schedule) == pytest.approx(log_cosh, rel=1e-6)
    huber = LossSettings(huber_strength=1.0, huber_schedule="constant", huber_c=0.2, huber_scale=1.5)
    assert loss_of(huber, tiny_schedule) == pytest.approx(sum(pseudo_huber(d, 0.3) for d in DIFFS) / n, rel=1e-6)
    # a strength of 3 alone triples the loss
    assert loss_of(LossSettings(mae_strength=3.0), tiny_schedule) == pytest.approx(3 * sum(map(abs, DIFFS)) / n)


def test_mix_is_the_weighted_sum_of_terms(tiny_schedule):
    settings = LossSettings(
        mse_strength=0.5, mae_strength=2.0, log_cosh_strength=1.0, huber_strength=0.25, huber_schedule="constant"
    )
    expected = sum(
        0.5 * d * d + 2.0 * abs(d) + math.log(math.cosh(d)) + 0.25 * pseudo_huber(d, 0.1) for d in DIFFS
    ) / len(DIFFS)
    assert loss_of(settings, tiny_schedule) == pytest.approx(expected, rel=1e-6)
    # a term given as 0 drops out; unset strengths count 0 once any is given
    assert loss_of(LossSettings(mse_strength=0.0, mae_strength=1.0), tiny_schedule) == pytest.approx(
        sum(map(abs, DIFFS)) / len(DIFFS)
    )
    assert settings.terms == (("l2", 0.5), ("l1", 2.0), ("log_cosh", 1.0), ("huber", 0.25))
    assert LossSettings(loss_type="smooth_l1").terms == (("smooth_l1", 1.0),)


def test_huber_term_follows_the_huber_schedule(tiny_schedule):
    # snr schedule: c_t = (1 - c) / (1 + sigma_t)^2 + c with sigma_3 = sqrt(0.99 / 0.01)
    c = (1 - 0.1) / (1 + math.sqrt(99)) ** 2 + 0.1
    settings = LossSettings(huber_strength=2.0)
    expected = 2.0 * sum(pseudo_huber(d, c) for d in DIFFS) / len(DIFFS)
    assert loss_of(settings, tiny_schedule, t=3) == pytest.approx(expected, rel=1e-6)


def test_log_cosh_does_not_overflow():
    big = log_cosh_loss(torch.tensor([200.0, -200.0]), torch.zeros(2))
    assert big.tolist() == pytest.approx([200 - math.log(2), 200 - math.log(2)])


def test_contradictions_are_refused_in_one_line():
    with pytest.raises(UserError, match="--loss_type l1 and --mse_strength both choose the loss"):
        LossSettings(loss_type="l1", mse_strength=1.0)
    with pytest.raises(UserError, match="all 0"):
        LossSettings(mse_strength=0.0, huber_strength=0.0)
    with pytest.raises(UserError, match="0 or more"):
        LossSettings(mae_strength=-1.0)
    with pytest.raises(UserError, match="--huber_c"):
        LossSettings(huber_strength=1.0, huber_c=0.0)
    with pytest.raises(UserError, match="--p2_loss_weight_k"):
        LossSettings(p2_loss_weight_gamma=1.0, p2_loss_weight_k=0.0)


def test_flags_read_into_settings():
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    args = parser.parse_args(
        "--mse_strength 0.5 --log_cosh_strength 2 --p2_loss_weight_gamma 0.5 --p2_loss_weight_k 2 "
        "--unmasked_probability 0.1 --unmasked_weight 0.2 --normalize_masked_area_loss --masked_loss".split()
    )
    settings = settings_from_flags(LossSettings, args)
    assert settings.terms == (("l2", 0.5), ("log_cosh", 2.0))
    assert (settings.p2_loss_weight_gamma, settings.p2_loss_weight_k) == (0.5, 2.0)
    assert (settings.unmasked_probability, settings.unmasked_weight, settings.normalize_masked_area_loss) == (
        0.1,
        0.2,
        True,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--mae_strength", "-1"])


def test_p2_weight_by_hand(tiny_schedule):
    t = torch.tensor([0, 1, 2, 3])
    assert p2_weight(t, tiny_schedule, 1.0, 1.0, False).tolist() == pytest.approx([1 / (1 + s) for s in SNR])
    assert p2_weight(t, tiny_schedule, 0.5, 2.0, False).tolist() == pytest.approx([(2 + s) ** -0.5 for s in SNR])
    # v-prediction uses snr + 1, as OneTrainer
    assert p2_weight(t, tiny_schedule, 1.0, 1.0, True).tolist() == pytest.approx([1 / (2 + s) for s in SNR])


def test_p2_multiplies_with_min_snr(tiny_schedule):
    t = torch.tensor([0, 1, 2, 3])
    pred = torch.arange(16, dtype=torch.float32).view(4, 1, 2, 2) / 8
    target = torch.zeros(4, 1, 2, 2)
    plain = per_sample_loss(pred, target, t, tiny_schedule, LossSettings())
    p2 = per_sample_loss(pred, target, t, tiny_schedule, LossSettings(p2_loss_weight_gamma=1.0))
    both = per_sample_loss(pred, target, t, tiny_schedule, LossSettings(p2_loss_weight_gamma=1.0, min_snr_gamma=1.0))
    assert p2.tolist() == pytest.approx((plain * torch.tensor([1 / (1 + s) for s in SNR])).tolist())
    expected = plain * min_snr_weight(t, tiny_schedule, 1.0, False) * torch.tensor([1 / (1 + s) for s in SNR])
    assert both.tolist() == pytest.approx(expected.tolist())


def test_default_path_is_bit_identical_to_before():
    """Golden values printed by the code before loss mixing, timestep distributions and mask options existed."""
    scheduler = training_scheduler(sd_scheduler())
    generator = torch.Generator().manual_seed(1234)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    batch = noise_and_timesteps(latents, scheduler, NoiseSettings(), generator)
    assert batch.timesteps.tolist() == [441, 738, 214, 427]
    assert float(batch.noisy_latents.sum()) == -65.64952850341797
    batch = noise_and_timesteps(latents, scheduler, NoiseSettings(min_timestep=100, max_timestep=300), generator)
    assert batch.timesteps.tolist() == [231, 100, 273, 144]
    pred = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    mask = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    golden = {
        "l2": [0.9020332098007202, 0.6549153923988342, 1.1211261749267578, 1.0020426511764526],
        "l1": [0.5265558958053589, 0.3605576157569885, 0.6003103852272034, 0.5703322291374207],
        "huber": [0.32760655879974365, 0.2866761386394501, 0.3580935597419739, 0.41942059993743896],
        "smooth_l1": [0.7589753270149231, 0.4791537821292877, 0.9145325422286987, 0.787659227848053],
    }
    for loss_type, values in golden.items():
        settings = LossSettings(loss_type=loss_type, min_snr_gamma=5)
        loss = per_sample_loss(pred, batch.target, batch.timesteps, scheduler, settings, mask=mask)
        assert loss.tolist() == values, loss_type
