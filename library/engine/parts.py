"""The pluggable pieces of one training step: text conditioning, noising, loss, optimizer, schedule, sampling.

Entry scripts build them from flags (see ``library.engine.wiring``); tests may build them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.models.components import Components
from library.models.family import TextEncoding


@dataclass(frozen=True)
class LossInputs:
    """What a loss function sees for one batch (``latents`` are scaled, ``alpha_masks`` may be None; ``generator``
    is the step's, for draws the loss makes, e.g. ``--unmasked_probability``)."""

    model_pred: torch.Tensor
    target: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    alpha_masks: torch.Tensor | None
    step: int
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class SampleRequest:
    """A request to render sample images with the model as trained so far (main process only).

    ``epoch`` counts completed epochs for epoch-end samples (0 for ``--sample_at_first``) and is None for step
    samples; ``accelerator`` gives hooks the run's autocast and trackers; ``variant`` names samples of other
    weights than the saved ones (``noema``: the raw weights beside the EMA) and is empty for the usual samples.
    """

    components: Components
    step: int
    epoch: int | None
    output_dir: Path
    device: torch.device
    accelerator: Any = None
    variant: str = ""


NoiseFunction = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
OptimizerFactory = Callable[[list[dict[str, Any]], int], tuple[torch.optim.Optimizer, Any]]


@dataclass(frozen=True)
class TrainingParts:
    """Functions the loop calls; each is pure apart from the generator it is given.

    ``encode_text(text_encoders, tokenizers, captions, batch)`` gives the denoiser's ``Conditioning`` (the model
    family's ``text_encoding``, ``library.models.family.TextEncoding``); ``add_noise(latents,
    generator)`` gives ``(noisy_latents, noise, timesteps, target)`` (``library.noise.NoisedBatch``);
    ``loss(LossInputs)`` gives one loss per sample; ``make_optimizer(param_groups, total_steps)`` gives the
    optimizer and an LR scheduler that the loop steps once per optimizer step.
    """

    encode_text: TextEncoding
    add_noise: NoiseFunction
    loss: Callable[[LossInputs], torch.Tensor]
    make_optimizer: OptimizerFactory
    sample: Callable[[SampleRequest], Sequence[Any] | None] | None = None
