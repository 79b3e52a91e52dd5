"""LR schedulers: the multiplier at chosen steps against hand-computed values, step-count parsing, flags."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.config.settings import settings_from_flags
from library.config.train_flags import add_optimizer_arguments
from library.errors import UserError
from library.optimizers import OptimizerSettings, make_optimizer, optimizer_from_settings
from library.schedulers import LRSchedulerSettings, lr_scheduler_from_settings, make_lr_scheduler, resolve_steps


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs_at(scheduler, steps: list[int]) -> list[float]:
    """The LR after ``step`` scheduler steps, for each requested step (ascending)."""
    out, current = [], 0
    for step in steps:
        while current < step:
            scheduler.optimizer.step()
            scheduler.step()
            current += 1
        out.append(scheduler.get_last_lr()[0])
    return out


def test_resolve_steps_forms():
    assert resolve_steps("10%", 200, "--lr_warmup_steps") == 20
    assert resolve_steps(0.1, 200, "--lr_warmup_steps") == 20
    assert resolve_steps(10, 200, "--lr_warmup_steps") == 10
    assert resolve_steps("10", 200, "--lr_warmup_steps") == 10
    assert resolve_steps("0.25", 200, "--lr_warmup_steps") == 50
    assert resolve_steps("29%", 100, "--lr_warmup_steps") == 29
    assert resolve_steps(1.0, 50, "--lr_warmup_steps") == 50
    assert resolve_steps(None, 50, "--lr_warmup_steps") == 0
    for bad in (-1, "abc", 2.5, "-5%"):
        with pytest.raises(UserError, match="--lr_warmup_steps"):
            resolve_steps(bad, 100, "--lr_warmup_steps")


def test_flag_defaults_and_warmup_parsing():
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args([])
    assert args.learning_rate == 2e-6 and args.max_grad_norm == 1.0
    assert (args.optimizer_type, args.optimizer_args, args.lr_scheduler) == ("", None, "constant")
    assert (args.lr_warmup_steps, args.lr_decay_steps, args.lr_scheduler_num_cycles) == (0, 0, 1)
    assert (args.lr_scheduler_power, args.lr_scheduler_min_lr_ratio, args.lr_scheduler_type) == (1, None, "")
    assert not (args.use_8bit_adam or args.use_lion_optimizer or args.fused_backward_pass)
    assert parser.parse_args(["--lr_warmup_steps", "10%"]).lr_warmup_steps == 0.1
    assert parser.parse_args(["--lr_warmup_steps", "0.1"]).lr_warmup_steps == 0.1
    assert parser.parse_args(["--lr_warmup_steps", "10"]).lr_warmup_steps == 10
    parsed = parser.parse_args(["--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99"])
    assert parsed.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.99"]


@pytest.mark.parametrize("warmup", ["20%", 0.2, 2])
def test_linear_with_each_warmup_form(warmup):
    # total 10, warmup 2: s/2 during warmup, then (10 - s) / 8
    scheduler = make_lr_scheduler("linear", sgd(), 10, warmup)
    assert lrs_at(scheduler, [0, 1, 2, 6, 10]) == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_cosine():
    # 0.5 * (1 + cos(pi * progress)), progress = (s - 2) / 8
    scheduler = make_lr_scheduler("cosine", sgd(), 10, 2)
    assert lrs_at(scheduler, [1, 2, 4, 6, 10]) == pytest.approx([0.5, 1.0, 0.8535534, 0.5, 0.0])


def test_cosine_with_restarts():
    # two cycles: 0.5 * (1 + cos(pi * ((2 * progress) % 1)))
    scheduler = make_lr_scheduler("cosine_with_restarts", sgd(), 10, 2, num_cycles=2)
    assert lrs_at(scheduler, [4, 5, 6, 8, 9]) == pytest.approx([0.5, 0.1464466, 1.0, 0.5, 0.1464466])


def test_polynomial():
    # (1 - 1e-7) * (1 - progress)^2 + 1e-7
    scheduler = make_lr_scheduler("polynomial", sgd(), 10, 2, power=2.0)
    assert lrs_at(scheduler, [1, 2, 6, 10]) == pytest.approx([0.5, 1.0, 0.25 + 0.75e-7, 1e-7])


def test_constant_and_constant_with_warmup():
    assert lrs_at(make_lr_scheduler("constant", sgd(0.3), 10), [0, 5, 10]) == pytest.approx([0.3] * 3)
    scheduler = make_lr_scheduler("constant_with_warmup", sgd(), 10, "40%")
    assert lrs_at(scheduler, [0, 1, 2, 4, 9]) == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])
    with pytest.raises(UserError, match="--lr_scheduler constant takes no warmup"):
        make_lr_scheduler("constant", sgd(), 10, 2)


def test_cosine_with_min_lr_and_warmup_stable_decay():
    # num_cycles 1 -> 0.5 (sd-scripts halves it): factor * 0.9 + 0.1
    scheduler = make_lr_scheduler("cosine_with_min_lr", sgd(), 10, 2, min_lr_ratio=0.1)
    assert lrs_at(scheduler, [1, 2, 6, 10]) == pytest.approx([0.5, 1.0, 0.55, 0.1])
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        make_lr_scheduler("cosine_with_min_lr", sgd(), 10, 2)
    # warmup 2, decay 4 -> stable 4 (steps 2-5), cosine decay over steps 6-9, then min_lr_ratio
    wsd = make_lr_scheduler("warmup_stable_decay", sgd(), 10, 2, decay_steps=4, min_lr_ratio=0.2)
    # warmup is floored at min_lr_ratio too: 0.2 + 0.8 * s / 2
    expected = [0.2 + 0.8 * 0.5, 1.0, 1.0, 1.0, 0.2 + 0.8 * 0.5, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.2]
    assert lrs_at(wsd, [1, 2, 5, 6, 8, 9, 10]) == pytest.approx(expected)
    assert lrs_at(make_lr_scheduler("warmup_stable_decay", sgd(), 10, 2, decay_steps=4), [1])[0] == pytest.approx(0.5)
    with pytest.raises(UserError, match="exceed the 10 training steps"):
        make_lr_scheduler("warmup_stable_decay", sgd(), 10, 6, decay_steps=5)


def test_inverse_sqrt_and_other_transformers_names():
    # timescale defaults to warmup (2): 1 / sqrt(s / 2) after warmup
    scheduler = make_lr_scheduler("inverse_sqrt", sgd(), 100, 2)
    assert lrs_at(scheduler, [1, 2, 8, 18]) == pytest.approx([0.5, 1.0, 0.5, 1 / 3])
    plateau = make_lr_scheduler("reduce_lr_on_plateau", sgd(), 100, scheduler_args=["patience=3"])
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau) and plateau.patience == 3
    with pytest.raises(UserError, match="--lr_scheduler 'no_such' is unknown"):
        make_lr_scheduler("no_such", sgd(), 10)


def test_piecewise_constant():
    scheduler = make_lr_scheduler("piecewise_constant", sgd(), 10, scheduler_args=["step_rules='1:3,0.1:6,0.01'"])
    assert lrs_at(scheduler, [0, 2, 3, 5, 6, 9]) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_custom_scheduler_type():
    scheduler = make_lr_scheduler(
        "constant", sgd(), 10, scheduler_type="StepLR", scheduler_args=["step_size=2", "gamma=0.5"]
    )
    assert lrs_at(scheduler, [0, 1, 2, 4, 5]) == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.25])
    dotted = make_lr_scheduler(
        "constant", sgd(), 10, scheduler_type="torch.optim.lr_scheduler.ExponentialLR", scheduler_args=["gamma=0.5"]
    )
    assert lrs_at(dotted, [0, 1, 3]) == pytest.approx([1.0, 0.5, 0.125])
    with pytest.raises(UserError, match="--lr_scheduler_type StepLR takes no warmup"):
        make_lr_scheduler("constant", sgd(), 10, 2, scheduler_type="StepLR", scheduler_args=["step_size=2"])
    with pytest.raises(UserError, match="--lr_scheduler_args do not fit StepLR"):
        make_lr_scheduler("constant", sgd(), 10, scheduler_type="StepLR", scheduler_args=["bogus=1"])
    with pytest.raises(UserError, match="--lr_scheduler_type NoSuchLR"):
        make_lr_scheduler("constant", sgd(), 10, scheduler_type="NoSuchLR")


def test_adafactor_schedule_reports_adafactor_lr():
    param = torch.nn.Parameter(torch.ones(4))
    setup = make_optimizer("AdaFactor", [param], 1e-3)
    scheduler = make_lr_scheduler(setup.lr_scheduler_override, setup.optimizer, 10)
    assert scheduler.get_last_lr() == [1e-3]
    param.grad = torch.ones(4)
    setup.optimizer.step()
    scheduler.step()
    # relative step: min(1e-2, 1 / sqrt(1)) * max(1e-3, RMS(param before the update) = 1)
    assert scheduler.get_last_lr() == pytest.approx([1e-2])
    with pytest.raises(UserError, match="adafactor works only with --optimizer_type AdaFactor"):
        make_lr_scheduler("adafactor:0.001", sgd(), 10)


def test_schedule_free_gets_constant_schedule():
    setup = make_optimizer("AdamWScheduleFree", [torch.nn.Parameter(torch.ones(2))], 0.1)
    scheduler = make_lr_scheduler("cosine", setup.optimizer, 10, 2)
    assert lrs_at(scheduler, [0, 1, 5]) == pytest.approx([0.1, 0.1, 0.1])


def test_from_flags_end_to_end():
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args(
        ["--optimizer_type", "adamw", "--optimizer_args", "weight_decay=0.1", "--learning_rate", "0.5"]
        + ["--lr_scheduler", "cosine", "--lr_warmup_steps", "10%"]
    )
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    setup = optimizer_from_settings(
        settings_from_flags(OptimizerSettings, args), [{"params": [first]}, {"params": [second], "lr": 0.25}]
    )
    assert setup.name == "torch.optim.adamw.AdamW" and setup.args_text == "weight_decay=0.1"
    assert [g["lr"] for g in setup.optimizer.param_groups] == [0.5, 0.25]
    schedule = settings_from_flags(LRSchedulerSettings, args)
    scheduler = lr_scheduler_from_settings(schedule, setup.optimizer, 20, setup.lr_scheduler_override)
    assert lrs_at(scheduler, [1]) == pytest.approx([0.25])  # warmup 2 steps: 0.5 * 1/2
    assert scheduler.get_last_lr()[1] == pytest.approx(0.125)
    adafactor = parser.parse_args(["--optimizer_type", "AdaFactor", "--lr_scheduler", "cosine"])
    setup = optimizer_from_settings(settings_from_flags(OptimizerSettings, adafactor), [first])
    schedule = settings_from_flags(LRSchedulerSettings, adafactor)
    assert type(lr_scheduler_from_settings(schedule, setup.optimizer, 20, setup.lr_scheduler_override)).__name__ == (
        "AdafactorSchedule"
    )
