"""Learning-rate scheduler factory with sd-scripts' ``get_scheduler_fix`` semantics.

Standard names use transformers' schedule functions exactly as sd-scripts calls them; ``--lr_scheduler_type``
builds any scheduler class (``torch.optim.lr_scheduler`` name or ``module.Class``) with ``--lr_scheduler_args``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.config.train_flags import int_or_ratio
from library.errors import UserError
from library.optimizers import is_schedule_free, parse_key_values

logger = logging.getLogger(__name__)


def resolve_steps(value: int | float | str | None, total_steps: int, flag: str) -> int:
    """A step count from a flag value: an int count, a ratio in [0, 1] of ``total_steps``, or ``"10%"``.

    Ratios are rounded to 6 decimals before flooring, so ``"29%"`` of 100 is 29 (sd-scripts' plain ``int()``
    gives 28 through float error).
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise UserError(f"{flag} {value} is not a step count: use e.g. 100, 0.1 or 10%")
    if isinstance(value, str):
        try:
            value = int_or_ratio(value)
        except Exception as error:  # int_or_ratio's argparse.ArgumentTypeError, whose message names the problem
            raise UserError(f"{flag}: {error}") from None
    if value < 0:
        raise UserError(f"{flag} {value} is negative: use a step count, a ratio below 1 or a percentage")
    if isinstance(value, float):
        if value <= 1:
            return int(round(value * total_steps, 6))
        if not value.is_integer():
            raise UserError(f"{flag} {value} is neither a whole step count nor a ratio below 1")
    return int(value)


def _require_no_warmup(name: str, warmup_steps: int, flag: str = "--lr_scheduler") -> None:
    if warmup_steps:
        raise UserError(f"{flag} {name} takes no warmup: set --lr_warmup_steps 0 (it is {warmup_steps})")


def _import_class(path: str, default_module: str, flag: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{flag} {path}: module {module_name!r} cannot be imported ({error})") from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{flag} {path}: {module_name} has no {class_name}; check the spelling")
    return cls


def _call(factory: Any, description: str, *args: Any, **kwargs: Any) -> LRScheduler:
    try:
        return factory(*args, **kwargs)
    except TypeError as error:
        raise UserError(f"--lr_scheduler_args do not fit {description}: {error}") from error


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup_steps: int | float | str | None = 0,
    decay_steps: int | float | str | None = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    min_lr_ratio: float | None = None,
    scheduler_type: str | None = None,
    scheduler_args: Iterable[str] | None = None,
    timescale: int | None = None,
) -> LRScheduler:
    """Build the LR scheduler sd-scripts would for ``--lr_scheduler name`` and the related flags.

    ``num_training_steps`` is the number of optimizer steps (times the process count, as sd-scripts counts).
    ``name`` may be ``adafactor:<initial lr>`` as set by ``OptimizerSetup.lr_scheduler_override``.
    Schedule-free optimizers get a constant schedule whatever the name, as in sd-scripts.
    """
    warmup = resolve_steps(warmup_steps, num_training_steps, "--lr_warmup_steps")
    decay = resolve_steps(decay_steps, num_training_steps, "--lr_decay_steps")
    if warmup + decay > num_training_steps:
        raise UserError(
            f"--lr_warmup_steps ({warmup}) plus --lr_decay_steps ({decay}) exceed the {num_training_steps} "
            "training steps: lower them or train longer"
        )
    kwargs = parse_key_values(scheduler_args, "--lr_scheduler_args")

    if is_schedule_free(optimizer):
        if name != "constant" or warmup or scheduler_type:
            logger.warning("schedule-free optimizers set their own schedule: --lr_scheduler and warmup are ignored")
        return LambdaLR(optimizer, lambda _: 1.0)

    if scheduler_type:
        cls = _import_class(scheduler_type, "torch.optim.lr_scheduler", "--lr_scheduler_type")
        _require_no_warmup(scheduler_type, warmup, "--lr_scheduler_type")
        return _call(cls, scheduler_type, optimizer, **kwargs)

    key = name.strip().lower()
    if key.startswith("adafactor"):
        return _adafactor_schedule(key, optimizer, warmup)
    if key == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call(get_piecewise_constant_schedule, key, optimizer, **kwargs)
    return _transformers_schedule(
        key, optimizer, num_training_steps, warmup, decay, num_cycles, power, min_lr_ratio, timescale, kwargs
    )


@dataclass(frozen=True)
class LRSchedulerSettings:
    """The learning-rate schedule flags (``add_optimizer_arguments``); field names are the flags' names."""

    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_args: list[str] | None = None
    lr_scheduler_timescale: int | None = None


def lr_scheduler_from_settings(
    settings: LRSchedulerSettings,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    lr_scheduler_override: str | None = None,
) -> LRScheduler:
    """:func:`make_lr_scheduler` for these settings.

    Pass ``OptimizerSetup.lr_scheduler_override`` so Adafactor's relative step gets its own schedule.
    """
    return make_lr_scheduler(
        lr_scheduler_override or settings.lr_scheduler,
        optimizer,
        num_training_steps,
        warmup_steps=settings.lr_warmup_steps,
        decay_steps=settings.lr_decay_steps,
        num_cycles=settings.lr_scheduler_num_cycles or 1,
        power=settings.lr_scheduler_power,
        min_lr_ratio=settings.lr_scheduler_min_lr_ratio,
        scheduler_type=settings.lr_scheduler_type or None,
        scheduler_args=settings.lr_scheduler_args,
        timescale=settings.lr_scheduler_timescale,
    )


def _adafactor_schedule(key: str, optimizer: torch.optim.Optimizer, warmup: int) -> LRScheduler:
    from transformers.optimization import Adafactor, AdafactorSchedule

    if type(optimizer) is not Adafactor:
        raise UserError("--lr_scheduler adafactor works only with --optimizer_type AdaFactor: pick another scheduler")
    _require_no_warmup("adafactor", warmup)
    _, _, lr_text = key.partition(":")
    try:
        initial_lr = float(lr_text) if lr_text else 0.0
    except ValueError:
        raise UserError(f"--lr_scheduler {key}: the part after ':' must be the initial learning rate") from None
    return AdafactorSchedule(optimizer, initial_lr)


def _transformers_schedule(
    key: str,
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    decay: int,
    num_cycles: int,
    power: float,
    min_lr_ratio: float | None,
    timescale: int | None,
    kwargs: dict[str, Any],
) -> LRScheduler:
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

    try:
        kind = SchedulerType(key)
    except ValueError:
        names = ", ".join([t.value for t in SchedulerType] + ["adafactor", "piecewise_constant"])
        raise UserError(f"--lr_scheduler {key!r} is unknown: use one of {names}") from None
    fn = TYPE_TO_SCHEDULER_FUNCTION[kind]
    if kind == SchedulerType.CONSTANT:
        _require_no_warmup(key, warmup)
        return _call(fn, key, optimizer, **kwargs)
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return _call(fn, key, optimizer, num_warmup_steps=warmup, **kwargs)
    if kind == SchedulerType.INVERSE_SQRT:
        return _call(fn, key, optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)
    steps = dict(num_warmup_steps=warmup, num_training_steps=total)
    if kind in (SchedulerType.LINEAR, SchedulerType.COSINE):
        return _call(fn, key, optimizer, **steps, **kwargs)
    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        return _call(fn, key, optimizer, **steps, num_cycles=num_cycles, **kwargs)
    if kind == SchedulerType.POLYNOMIAL:
        return _call(fn, key, optimizer, **steps, power=power, **kwargs)
    if kind == SchedulerType.COSINE_WITH_MIN_LR:
        if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise UserError(f"--lr_scheduler {key} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        if min_lr_ratio is not None:
            kwargs = {"min_lr_rate": min_lr_ratio, **kwargs}
        return _call(fn, key, optimizer, **steps, num_cycles=num_cycles / 2, **kwargs)
    if kind == SchedulerType.WARMUP_STABLE_DECAY:
        return _call(
            fn,
            key,
            optimizer,
            num_warmup_steps=warmup,
            num_stable_steps=total - warmup - decay,
            num_decay_steps=decay,
            num_cycles=num_cycles / 2,
            min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0,
            **kwargs,
        )
    return _call(
        get_scheduler,
        key,
        key,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )
