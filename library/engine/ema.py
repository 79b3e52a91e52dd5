"""An exponential moving average of the trained weights (--ema): what is saved and sampled, kept in states."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError

logger = logging.getLogger("sdtrain")

EMA_FILE = "ema.safetensors"
EMA_DEVICES = ("same", "cpu")


@dataclass(frozen=True)
class EmaSettings:
    """The EMA flags (``--ema`` and the settings it takes); ``sample_without_ema`` also samples the raw weights."""

    ema: bool = False
    ema_decay: float = 0.999
    ema_update_every: int = 1
    ema_device: str = "same"
    sample_without_ema: bool = False

    def check(self) -> None:
        if not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"--ema_decay {self.ema_decay}: must be between 0 and 1 (e.g. 0.999)")
        if self.ema_update_every < 1:
            raise UserError(f"--ema_update_every {self.ema_update_every}: must be 1 or more")
        if self.ema_device not in EMA_DEVICES:
            raise UserError(f"--ema_device {self.ema_device}: must be one of {', '.join(EMA_DEVICES)}")
        if self.sample_without_ema and not self.ema:
            raise UserError("--sample_without_ema needs --ema (without it every sample uses the raw weights)")


def ema_decay(decay: float, step: int) -> float:
    """The decay applied after optimizer step ``step`` (1-based): ``min(decay, (1 + t) / (10 + t))`` with
    ``t = step - 1``, the warm-up OneTrainer and diffusers' EMAModel use, so early averages follow the weights."""
    t = step - 1
    return min(decay, (1 + t) / (10 + t))


class EmaWeights:
    """A float32 copy of ``params`` moved towards them after every ``update_every``-th optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], settings: EmaSettings) -> None:
        self.params = params
        self.decay = settings.ema_decay
        self.update_every = settings.ema_update_every
        self.device = torch.device("cpu") if settings.ema_device == "cpu" else None
        with torch.no_grad():
            self.shadow = [p.detach().to(device=self.device or p.device, dtype=torch.float32).clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based), when it is an update step."""
        if step % self.update_every:
            return
        keep = ema_decay(self.decay, step)
        for average, param in zip(self.shadow, self.params, strict=True):
            average.lerp_(param.detach().to(device=average.device, dtype=torch.float32), 1.0 - keep)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the trained parameters while inside; the raw ones come back on exit."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for param, average in zip(self.params, self.shadow, strict=True):
                param.copy_(average.to(device=param.device, dtype=param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw, strict=True):
                    param.copy_(saved)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages by position, for a state folder's ``ema.safetensors``."""
        return {f"ema.{i}": average.contiguous().cpu() for i, average in enumerate(self.shadow)}

    def load(self, state_dir: Path) -> bool:
        """Take the averages from ``state_dir``; False (and the averages unchanged) when it has none."""
        from safetensors.torch import load_file

        path = state_dir / EMA_FILE
        if not path.is_file():
            return False
        saved = load_file(str(path))
        if len(saved) != len(self.shadow) or any(
            saved.get(f"ema.{i}") is None or saved[f"ema.{i}"].shape != average.shape
            for i, average in enumerate(self.shadow)
        ):
            raise UserError(
                f"--resume {state_dir}: {EMA_FILE} does not match the trained weights; resume without --ema"
            )
        for i, average in enumerate(self.shadow):
            average.copy_(saved[f"ema.{i}"])
        return True
