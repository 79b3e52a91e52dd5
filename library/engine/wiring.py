"""Build the loop's TrainingParts from flags with the project's text, noise, loss, optimizer and sampling code."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from typing import Any

import torch

from library.engine.parts import LossInputs, SampleRequest, TrainingParts
from library.errors import UserError
from library.losses import LossSettings, per_sample_loss
from library.models.components import Components
from library.noise import NoiseSettings, noise_and_timesteps, training_scheduler
from library.optimizers import make_optimizer
from library.schedulers import make_lr_scheduler
from library.text.encode import TokenCache, encode_prompts


def choose_seed(args: argparse.Namespace) -> int:
    """--seed, else the seed of the state being resumed, else a fresh one (logged, and stored in states)."""
    from library.state import read_train_state, resolve_seed

    saved = read_train_state(args.resume).get("seed") if args.seed is None and getattr(args, "resume", None) else None
    return resolve_seed(args.seed, saved)


def text_encoding(args: argparse.Namespace, v2: bool):
    """``encode_text(text_encoder, tokenizer, captions)`` with --max_token_length, --clip_skip, --weighted_captions.

    Token ids are cached per caption (captions repeat every epoch), so each is tokenized once per run."""
    cache = TokenCache()

    def encode(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
        return encode_prompts(
            text_encoder,
            tokenizer,
            captions,
            max_token_length=getattr(args, "max_token_length", None),
            clip_skip=getattr(args, "clip_skip", None),
            weighted=bool(getattr(args, "weighted_captions", False)),
            v2=v2,
            cache=cache,
        )

    return encode


def _noise(latents: torch.Tensor, generator: torch.Generator, *, scheduler, settings: NoiseSettings):
    return tuple(noise_and_timesteps(latents, scheduler, settings, generator))


def _loss(inputs: LossInputs, *, scheduler, settings: LossSettings) -> torch.Tensor:
    return per_sample_loss(
        inputs.model_pred, inputs.target, inputs.timesteps, scheduler, settings, mask=inputs.alpha_masks
    )


def optimizer_factory(args: argparse.Namespace):
    """``make_optimizer(param_groups, total_steps) -> (optimizer, lr_scheduler)`` from the optimizer flags."""

    def build(groups: list[dict[str, Any]], total_steps: int):
        setup = make_optimizer(
            getattr(args, "optimizer_type", None),
            groups,
            args.learning_rate,
            getattr(args, "optimizer_args", None),
            use_8bit_adam=bool(getattr(args, "use_8bit_adam", False)),
            use_lion_optimizer=bool(getattr(args, "use_lion_optimizer", False)),
        )
        scheduler = make_lr_scheduler(
            setup.lr_scheduler_override or args.lr_scheduler,
            setup.optimizer,
            total_steps,
            warmup_steps=getattr(args, "lr_warmup_steps", 0),
            decay_steps=getattr(args, "lr_decay_steps", 0),
            num_cycles=getattr(args, "lr_scheduler_num_cycles", 1) or 1,
            power=getattr(args, "lr_scheduler_power", 1.0),
            min_lr_ratio=getattr(args, "lr_scheduler_min_lr_ratio", None),
            scheduler_type=getattr(args, "lr_scheduler_type", None) or None,
            scheduler_args=getattr(args, "lr_scheduler_args", None),
            timescale=getattr(args, "lr_scheduler_timescale", None),
        )
        return setup.optimizer, scheduler

    return build


def sampling_hook(args: argparse.Namespace):
    """Render --sample_prompts with ``library.sampling`` under the run's autocast, logging images to its trackers
    (None without a prompt file).

    The prompt file is read and every value checked here, at start-up, so a bad file is one error line before
    step 1; during training a failing sample is one warning and training goes on (``make_sample_hook``)."""
    from library.sampling import SampleSettings
    from library.sampling.hook import make_sample_hook

    settings = SampleSettings.from_args(args)
    if settings is None:
        return None
    if not settings.prompts_file.is_file():
        raise UserError(f"--sample_prompts {settings.prompts_file}: file not found")
    hook = make_sample_hook(settings)

    def sample(request: SampleRequest) -> None:
        hook(request)

    return sample


def parts_from_args(args: argparse.Namespace, components: Components) -> TrainingParts:
    """TrainingParts for SD 1.x/2.x from the noise, loss, optimizer, text and sample flags."""
    v_pred = components.v_parameterization
    noise_settings = dataclasses.replace(NoiseSettings.from_args(args), v_parameterization=v_pred)
    loss_settings = dataclasses.replace(LossSettings.from_args(args), v_parameterization=v_pred)
    scheduler = training_scheduler(components.scheduler, noise_settings.zero_terminal_snr)
    return TrainingParts(
        encode_text=text_encoding(args, components.v2),
        add_noise=partial(_noise, scheduler=scheduler, settings=noise_settings),
        loss=partial(_loss, scheduler=scheduler, settings=loss_settings),
        make_optimizer=optimizer_factory(args),
        sample=sampling_hook(args),
    )
