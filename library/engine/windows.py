"""Per-part training windows (--text_encoder_train_until, --unet_train_until): a part stops learning at a step
or epoch while the rest trains on, for every script (sd-scripts' --stop_text_encoder_training, generalised)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from library.errors import UserError

logger = logging.getLogger("sdtrain")

PARTS = {"text_encoder": "text_encoder_train_until", "unet": "unet_train_until"}
_UNTIL = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)?\s*$")


@dataclass(frozen=True)
class TrainUntil:
    """``N`` or ``Nsteps`` (optimizer steps) or ``Nepochs``: how long a part trains."""

    count: int
    unit: str  # "steps" or "epochs"

    @classmethod
    def parse(cls, text: str, flag: str) -> TrainUntil:
        match = _UNTIL.match(text)
        if match is None:
            raise UserError(f"--{flag} {text}: write a number of steps (500 or 500steps) or of epochs (3epochs)")
        unit = "epochs" if (match.group(2) or "").startswith("epoch") else "steps"
        return cls(int(match.group(1)), unit)

    def end_step(self, steps_per_epoch: int) -> int:
        """The number of optimizer steps after which the part stops training."""
        return self.count * (steps_per_epoch if self.unit == "epochs" else 1)

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


@dataclass(frozen=True)
class WindowSettings:
    """The window flags as given (None: the part trains to the end)."""

    text_encoder_train_until: str | None = None
    unet_train_until: str | None = None

    def windows(self) -> dict[str, TrainUntil]:
        """The parsed window of each part that has one (bad text is a one-line UserError)."""
        given = {part: getattr(self, flag) for part, flag in PARTS.items()}
        return {part: TrainUntil.parse(text, PARTS[part]) for part, text in given.items() if text is not None}


class TrainingWindows:
    """Freezes a part's trained parameters once its window ends (the optimizer then skips them: their gradients
    stay None); decided from the global step alone, so a resumed run freezes at the same step."""

    def __init__(
        self,
        windows: dict[str, TrainUntil],
        parts: dict[str, list[torch.nn.Parameter]],
        steps_per_epoch: int,
        trained: list[torch.nn.Parameter] | None = None,
    ) -> None:
        for part in windows:
            if not parts.get(part):
                what = part.replace("_", " ")
                raise UserError(f"--{PARTS[part]}: this run trains no {what} weights; drop the flag")
        self.windows = windows
        self.parts = parts
        self.ends = {part: window.end_step(steps_per_epoch) for part, window in windows.items()}
        self.stopped: set[str] = set()
        windowed = {id(p) for part in windows for p in parts[part]}
        self.covers_all = bool(windows) and all(id(p) in windowed for p in trained or [])

    def all_ended(self, global_step: int) -> bool:
        """Whether nothing is left to train after ``global_step`` steps: every trained parameter is in a part whose
        window has ended (training then stops there)."""
        return self.covers_all and all(global_step >= end for end in self.ends.values())

    def on_step_start(self, global_step: int) -> None:
        """Freeze every part whose window ends at or before ``global_step`` (steps done so far)."""
        for part, end in self.ends.items():
            if part in self.stopped or global_step < end:
                continue
            for param in self.parts[part]:
                param.requires_grad_(False)
                param.grad = None
            self.stopped.add(part)
            logger.info(
                f"{part.replace('_', ' ')} stops training at step {global_step} (--{PARTS[part]} {self.windows[part]})"
            )

    def trains(self, part: str) -> bool:
        """Whether ``part`` is still trained (True for a part without a window)."""
        return part not in self.stopped
