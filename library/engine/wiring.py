"""Build the loop's TrainingParts with the project's text, noise, loss, optimizer and sampling code.

:func:`parts_from_args` is the edge: it reads the flags into typed settings (``settings_from_flags``) and hands them
to :func:`parts_from_settings`, which sees no flags."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from library.config.settings import settings_from_flags
from library.engine.parts import LossInputs, TrainingParts
from library.errors import UserError
from library.losses import LossSettings, per_sample_loss
from library.models.components import Components
from library.noise import NoiseSettings, noise_and_timesteps, training_scheduler
from library.optimizers import OptimizerSettings, optimizer_from_settings
from library.sampling.flags import SampleFlags
from library.sampling.generate import SampleSettings
from library.sampling.hook import make_sample_hook
from library.schedulers import LRSchedulerSettings, lr_scheduler_from_settings
from library.text.encode import TextEncodingSettings


def _noise(latents: torch.Tensor, generator: torch.Generator, *, scheduler, settings: NoiseSettings):
    return tuple(noise_and_timesteps(latents, scheduler, settings, generator))


def _loss(inputs: LossInputs, *, scheduler, settings: LossSettings) -> torch.Tensor:
    return per_sample_loss(
        inputs.model_pred,
        inputs.target,
        inputs.timesteps,
        scheduler,
        settings,
        mask=inputs.alpha_masks,
        generator=inputs.generator,
    )


def optimizer_factory(optimizer: OptimizerSettings, schedule: LRSchedulerSettings):
    """``make_optimizer(param_groups, total_steps) -> (optimizer, lr_scheduler)`` from the optimizer settings."""

    def build(groups: list[dict[str, Any]], total_steps: int):
        setup = optimizer_from_settings(optimizer, groups)
        scheduler = lr_scheduler_from_settings(schedule, setup.optimizer, total_steps, setup.lr_scheduler_override)
        return setup.optimizer, scheduler

    return build


def read_sample_settings(args: argparse.Namespace) -> SampleSettings | None:
    """The sampling settings the flags ask for (None without --sample_prompts)."""
    return settings_from_flags(SampleFlags, args).settings()


def sampling_hook(settings: SampleSettings | None):
    """Render the prompt file with ``library.sampling`` under the run's autocast, logging images to its trackers
    (None without settings).

    The prompt file is read and every value checked here, at start-up, so a bad file is one error line before
    step 1; during training a failing sample is one warning and training goes on (``make_sample_hook``)."""
    if settings is None:
        return None
    if not settings.prompts_file.is_file():
        raise UserError(f"--sample_prompts {settings.prompts_file}: file not found")
    return make_sample_hook(settings)


def parts_from_settings(
    components: Components,
    *,
    text: TextEncodingSettings,
    noise: NoiseSettings,
    loss: LossSettings,
    optimizer: OptimizerSettings,
    schedule: LRSchedulerSettings,
    sample: SampleSettings | None,
) -> TrainingParts:
    """TrainingParts from typed settings: the model family's text conditioning (token ids cached per caption), the
    noise and loss (``noise`` and ``loss`` carry the model's v-parameterization), optimizer and sampling."""
    scheduler = training_scheduler(components.scheduler, noise.zero_terminal_snr)
    return TrainingParts(
        encode_text=components.family.text_encoding(text),
        add_noise=partial(_noise, scheduler=scheduler, settings=noise),
        loss=partial(_loss, scheduler=scheduler, settings=loss),
        make_optimizer=optimizer_factory(optimizer, schedule),
        sample=sampling_hook(sample),
    )


def parts_from_args(args: argparse.Namespace, components: Components) -> TrainingParts:
    """TrainingParts from the noise, loss, optimizer, text and sample flags; the v-parameterization is the loaded
    model's."""
    v_pred = components.v_parameterization
    return parts_from_settings(
        components,
        text=settings_from_flags(TextEncodingSettings, args),
        noise=settings_from_flags(NoiseSettings, args, v_parameterization=v_pred),
        loss=settings_from_flags(LossSettings, args, v_parameterization=v_pred),
        optimizer=settings_from_flags(OptimizerSettings, args),
        schedule=settings_from_flags(LRSchedulerSettings, args),
        sample=read_sample_settings(args),
    )
