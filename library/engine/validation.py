"""The validation loss: the training step's loss on the held-out images, at fixed timesteps with fixed noise.

Each validation batch is evaluated once per timestep of a small fixed set (as sd-scripts: 4 timesteps evenly
spaced inside the training range, 200/400/600/800 of 1000), with noise drawn from a generator seeded by the
validation seed, the batch and the timestep, so the value is the same in every run, after a resume and whatever the
training seed; the global RNG is forked and restored, so training draws the same numbers with or without validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from library.engine.data import BatchSource
from library.engine.parts import TrainingParts
from library.engine.step import StepModels, batch_loss
from library.noise import NoisedBatch, add_noise, timestep_bounds, training_target
from library.seeds import derive_seed, step_generator

VALIDATION_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


@dataclass(frozen=True)
class ValidationSettings:
    """When the validation loss is computed (flag names; build with ``settings_from_flags``): every N optimizer
    steps, every N epochs (unset: every epoch, as sd-scripts), on at most N validation batches (unset: all)."""

    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None

    def due_after_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) ends with a validation."""
        return self.validate_every_n_steps is not None and step % self.validate_every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (counted from 1) ends with a validation."""
        return self.validate_every_n_epochs is None or epoch % self.validate_every_n_epochs == 0


def validation_timesteps(low: int, high: int, count: int = VALIDATION_TIMESTEPS) -> tuple[int, ...]:
    """``count`` timesteps evenly spaced strictly inside ``[low, high]`` (sd-scripts' ``linspace(low, high,
    count + 2)[1:-1]``, rounded down); ``low >= high`` gives ``high`` (the training range's single timestep)."""
    if low >= high:
        return (high,)
    return tuple(low + (high - low) * k // (count + 1) for k in range(1, count + 1))


def timesteps_for(noise_settings: Any, num_train_timesteps: int) -> tuple[int, ...]:
    """The validation timesteps inside the training range of ``noise_settings`` (--min/--max_timestep or the
    noising strengths: ``library.noise.timestep_bounds``)."""
    low, high = timestep_bounds(noise_settings, num_train_timesteps)
    return validation_timesteps(low, high)


def fixed_noising(timestep: int, scheduler: Any, v_parameterization: bool):
    """``parts.add_noise`` at one given timestep: plain Gaussian noise from the generator (no offset, pyramid or
    input-perturbation noise), the scheduler's forward step and the training target."""

    def noised(latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        noise = torch.randn(tuple(latents.shape), generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
        noisy = add_noise(scheduler, latents, noise, timesteps)
        target = training_target(latents, noise, timesteps, scheduler, v_parameterization)
        return NoisedBatch(noisy, noise, timesteps, target)

    return noised


class Validator:
    """The validation loss of ``source`` (its epoch-1 batch plan, in order, at most ``max_steps`` batches), built
    once per run; ``scheduler`` is the training noise scheduler (``library.noise.training_scheduler``)."""

    def __init__(
        self,
        source: BatchSource,
        *,
        seed: int,
        max_steps: int | None,
        timesteps: Sequence[int],
        scheduler: Any,
        v_parameterization: bool,
    ):
        if not timesteps:
            raise ValueError("at least one validation timestep is needed")
        self.source = source
        self.seed = seed
        self.plans = list(source.batch_plan(1))[:max_steps]
        self.timesteps = tuple(int(t) for t in timesteps)
        self.scheduler = scheduler
        self.v_parameterization = v_parameterization

    def __len__(self) -> int:
        """Forward passes per run: batches times timesteps."""
        return len(self.plans) * len(self.timesteps)

    def run(
        self,
        models: StepModels,
        parts: TrainingParts,
        *,
        device: torch.device,
        weight_dtype: torch.dtype,
        autocast: Callable[[], contextlib.AbstractContextManager],
        step: int = 0,
        modules: Sequence[nn.Module] = (),
    ) -> dict[str, float]:
        """The mean loss per subset name and, under ``""``, over every sample (each sample and timestep counts
        once). Per-sample losses are weighted as in training (``loss_weights``: the subset's loss_weight).

        The UNet, the text encoders and ``modules`` (the recipe's trained modules, for network dropout) run in eval
        mode and are put back as they were; ``step`` is the optimizer step the loss sees (``LossInputs.step``)."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        with _eval_mode([models.unet, *models.text_encoders, *modules]), torch.no_grad():
            for b, plan in enumerate(self.plans):
                batch = self.source.load_batch(plan)
                if batch is None:
                    continue
                names = list(batch["subsets"])
                for j, timestep in enumerate(self.timesteps):
                    losses = self._batch_losses(
                        batch, b, j, timestep, models, parts, device, weight_dtype, autocast, step
                    )
                    for name, value in zip(names, losses.tolist()):
                        for key in (name, ""):
                            totals[key] = totals.get(key, 0.0) + value
                            counts[key] = counts.get(key, 0) + 1
        return {key: totals[key] / counts[key] for key in totals}

    def _batch_losses(
        self,
        batch: dict[str, Any],
        b: int,
        j: int,
        timestep: int,
        models: StepModels,
        parts: TrainingParts,
        device: torch.device,
        weight_dtype: torch.dtype,
        autocast: Callable[[], contextlib.AbstractContextManager],
        step: int,
    ) -> torch.Tensor:
        """One batch at one timestep through the training step (``batch_loss``): its weighted per-sample losses."""
        fixed = dataclasses.replace(parts, add_noise=fixed_noising(timestep, self.scheduler, self.v_parameterization))
        devices = [device] if device.type not in ("cpu", "meta") else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(derive_seed(self.seed, "validation-global", b, j))
            result = batch_loss(
                batch,
                models=models,
                parts=fixed,
                autocast=autocast(),
                generator=step_generator(self.seed, "validation", b, j),
                device=device,
                weight_dtype=weight_dtype,
                train_text_encoder=False,
                step=step,
            )
        return result.per_sample.float().cpu()


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every module (and submodule) in eval mode inside, each back in its own mode afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.train(training)
