"""The small interface through which an entry script tells the shared loop what it trains and how to save it."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.models.components import Components


@dataclass(frozen=True)
class ParamGroups:
    """Optimizer parameter groups plus one name per group, used for ``lr/<name>`` logging."""

    groups: list[dict[str, Any]]
    names: list[str]


class Recipe(ABC):
    """What is trainable, how it is grouped for the optimizer, how it is saved, and what it adds to the state.

    The loop calls, in order: :meth:`setup` once, :meth:`trainable_modules` and :meth:`param_groups` once,
    :meth:`begin` once, then per epoch :meth:`on_epoch_start`, per optimizer step :meth:`on_step_start`, per batch
    :meth:`on_batch`, after each optimizer step that was taken :meth:`after_optimizer_step`, and :meth:`save`
    whenever a model file is due (main process only).
    """

    extension: str = ".safetensors"

    @property
    @abstractmethod
    def train_unet(self) -> bool:
        """Whether gradients flow through the UNet into trained weights."""

    @property
    @abstractmethod
    def train_text_encoder(self) -> bool:
        """Whether the text encoder runs with gradients (a trained text-encoder part)."""

    @abstractmethod
    def setup(self, components: Components, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Freeze the base model and attach or select what is trained."""

    @abstractmethod
    def trainable_modules(self) -> list[nn.Module]:
        """The modules holding trained weights; they are handed to accelerate and saved in training states."""

    @abstractmethod
    def param_groups(self) -> ParamGroups:
        """Optimizer parameter groups (each with ``params`` and optionally ``lr``)."""

    @abstractmethod
    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        """Write the trained weights to ``path`` atomically."""

    def full_precision_modules(self, components: Components) -> list[nn.Module]:
        """Base-model modules this recipe trains whole (called before :meth:`setup`): the loop does not cast them
        to the working precision, which would round the starting weights (sd-scripts keeps them in float32)."""
        return []

    def fingerprint(self) -> dict[str, Any]:
        """What must stay the same for a state to be resumable: by default the names and shapes of trained weights."""
        shapes = {
            f"{i}.{name}": list(p.shape)
            for i, module in enumerate(self.trainable_modules())
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
        return {"trainable_tensors": len(shapes), "trainable_shapes": digest}

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trained parameters of each part (``text_encoder``, ``unet``) that --text_encoder_train_until /
        --unet_train_until can stop; by default none (the flags are then refused)."""
        return {}

    def begin(self, plan: Any, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """Called once the run's step plan (``library.engine.schedule.RunPlan``), seed and optimizer are known."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first batch of each epoch (0-based)."""
        return None

    def on_step_start(self, global_step: int) -> None:
        """Called before the first batch of every optimizer step with the number of steps already counted (0 for
        the first step of a fresh run; the resume / --initial_step position after a restart).

        A step skipped under ``--nan_policy skip`` counts like any other, as it does for ``--max_train_steps``,
        saves and logs: the step after it gets ``global_step + 1`` although the weights did not move."""
        return None

    def on_batch(self, batch: dict[str, Any]) -> None:
        """Called before each forward pass with the loaded batch (e.g. per-sample network multipliers)."""
        return None

    def after_optimizer_step(self, device: torch.device) -> dict[str, float]:
        """Called after each optimizer step; returns extra scalars to log (e.g. max-norm statistics)."""
        return {}
