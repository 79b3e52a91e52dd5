"""The accelerate set-up of a run (precision, trackers) and the loss numbers shown and logged during training."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from library.config.runtime_flags import accelerate_kwargs_handlers, deepspeed_plugin
from library.engine.config import EngineConfig
from library.engine.report import LossSpan
from library.errors import UserError


def run_logging_dir(config: EngineConfig, now: float | None = None) -> Path | None:
    """sd-scripts' layout: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``."""
    if config.logging_dir is None:
        return None
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
    return config.logging_dir / f"{config.log_prefix or ''}{stamp}"


def tracker_kinds(config: EngineConfig) -> str | list[str] | None:
    """Which accelerate trackers to start; TensorBoard by default once --logging_dir is given."""
    if config.log_with is None:
        return "tensorboard" if config.logging_dir is not None else None
    if config.log_with in ("tensorboard", "all") and config.logging_dir is None:
        raise UserError(f"--log_with {config.log_with} needs --logging_dir (the folder for TensorBoard event files)")
    if config.log_with == "all":
        return ["tensorboard", "wandb"]
    return config.log_with


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch`` / torchrun) started, before accelerate is set up."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch_device() -> torch.device:
    """This process's device as the launcher assigned it (for work done before the loop, e.g. latent caching)."""
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def make_accelerator(config: EngineConfig, now: float | None = None) -> Accelerator:
    """An Accelerator for one run; gradient accumulation is done by the loop itself, so it stays at 1 here.

    Several launched processes without a GPU are joined over gloo (accelerate's MULTI_CPU), so
    ``accelerate launch --multi_gpu --num_processes N`` trains data-parallel on a CPU-only machine too.
    --ddp_* flags become accelerate kwargs handlers and --deepspeed a DeepSpeed plugin, as in sd-scripts; dynamo is
    off here (``accelerate launch --dynamo_backend`` included) because --torch_compile compiles the UNet itself.
    """
    kinds = tracker_kinds(config)
    if kinds in ("wandb", ["tensorboard", "wandb"]):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                "--log_with wandb needs the wandb package: pip install 'sd-trainer[wandb]' (or pip install wandb)"
            ) from None
    logging_dir = run_logging_dir(config, now)
    return Accelerator(
        cpu=launch_device().type == "cpu" and launched_processes() > 1,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=1,
        log_with=kinds,
        project_dir=None if logging_dir is None else str(logging_dir),
        kwargs_handlers=accelerate_kwargs_handlers(config.distributed),
        dynamo_backend="no",
        deepspeed_plugin=deepspeed_plugin(config, launched_processes()),
    )


def start_trackers(accelerator: Accelerator, config: EngineConfig, default_name: str) -> None:
    if not accelerator.log_with:
        return
    init_kwargs: dict[str, Any] = {}
    if config.log_tracker_config is not None:
        try:
            init_kwargs = toml.load(config.log_tracker_config)
        except (OSError, toml.TomlDecodeError) as e:
            raise UserError(f"--log_tracker_config {config.log_tracker_config}: cannot read it ({e})") from e
    if config.wandb_run_name:
        init_kwargs.setdefault("wandb", {})["name"] = config.wandb_run_name
    accelerator.init_trackers(
        config.log_tracker_name or default_name, config=config.tracker_config or None, init_kwargs=init_kwargs
    )


def release_accelerator(accelerator: Accelerator) -> None:
    """End trackers and forget accelerate's process-wide settings so a second run in this process starts clean."""
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@dataclass
class LossRecorder:
    """Moving average of the loss over the last epoch's worth of steps (sd-scripts' ``loss/average``); ``span``
    keeps the first and last steps' losses for the run's report."""

    window: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps_per_epoch: int = 1
    span: LossSpan = field(default_factory=LossSpan)

    def add(self, loss: float) -> None:
        self.span.add(loss)
        self.window.append(loss)
        if len(self.window) > self.steps_per_epoch:
            self.window.pop(0)
        self.epoch_losses.append(loss)

    @property
    def average(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    def end_epoch(self) -> float:
        """The mean loss of the epoch just finished; starts a new epoch."""
        value = sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else 0.0
        self.epoch_losses = []
        return value


def step_logs(loss: float, average: float, lrs: list[float], names: list[str]) -> dict[str, float]:
    logs = {"loss/current": loss, "loss/average": average}
    for name, lr in zip(names, lrs):
        logs[f"lr/{name}"] = lr
    return logs
