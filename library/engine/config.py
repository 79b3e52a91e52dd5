"""The training loop's settings, read once from the parsed flags into a frozen value."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.config.runtime_flags import DistributedSettings, check_deepspeed
from library.config.settings import settings_from_flags
from library.engine.ema import EmaSettings
from library.engine.windows import WindowSettings
from library.errors import UserError
from library.hub import HubSettings
from library.saving import SavePlan, check_output_location
from library.state import LATEST, latest_state

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the loop needs from the command line; built by :meth:`from_args` or directly in tests."""

    output_dir: Path
    output_name: str | None = None
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    backup_every_n_minutes: float | None = None
    backup_keep_last: int | None = None
    resume: Path | None = None
    initial_step: int | None = None
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    max_grad_norm: float = 1.0
    fused_backward_pass: bool = False
    seed: int | None = None
    nan_policy: str = "stop"
    logging_dir: Path | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: Path | None = None
    wandb_run_name: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_every_n_minutes: float | None = None
    sample_at_first: bool = False
    max_data_loader_n_workers: int | None = None
    persistent_data_loader_workers: bool = False
    train_batch_size: int = 1
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    ema_settings: EmaSettings = field(default_factory=EmaSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    hub_resume: str | None = None  # --resume under --resume_from_huggingface: the state on the Hub to download
    latents_cached: bool = False  # every batch brings cached latents: the VAE can leave the accelerator
    tracker_config: dict[str, Any] = field(default_factory=dict)  # flags logged as hyperparameters (--log_config)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        """Pick the loop's settings out of the parsed flags and check the ones that would fail late."""
        if not args.output_dir:
            raise UserError("--output_dir is required: the folder where trained models and states are written")
        paths = {name: Path(vars(args)[name]) for name in _PATH_FLAGS if vars(args).get(name) is not None}
        computed: dict[str, Any] = {
            "max_grad_norm": args.max_grad_norm or 0.0,
            "latents_cached": bool(args.cache_latents or args.cache_latents_to_disk),
            "tracker_config": _loggable(vars(args)) if args.log_config else {},
            "distributed": settings_from_flags(DistributedSettings, args),
            "ema_settings": settings_from_flags(EmaSettings, args),
            "windows": settings_from_flags(WindowSettings, args),
            "hub": settings_from_flags(HubSettings, args),
        }
        computed["hub"].check(args.resume)
        if computed["hub"].resume_from_huggingface:
            computed["resume"], computed["hub_resume"] = None, args.resume
        elif args.resume == LATEST:
            computed["resume"] = latest_state(Path(args.output_dir), args.output_name)
            where = computed["resume"] or f"no state of this run in {args.output_dir} yet: starting from the beginning"
            logger.info(f"--resume latest: {where}")
        if args.deepspeed:
            computed["max_data_loader_n_workers"] = 1  # sd-scripts' rule: more workers die under DeepSpeed
        config = settings_from_flags(EngineConfig, args, **{**paths, **computed})
        config.validate()
        check_output_location(config.output_dir, config.output_name)
        return config

    def validate(self) -> None:
        for name in (
            "max_train_steps",
            "gradient_accumulation_steps",
            "save_every_n_epochs",
            "save_every_n_steps",
            "max_train_epochs",
            "sample_every_n_steps",
            "sample_every_n_epochs",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} {value}: must be 1 or more")
        for name in ("save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name} {value}: must be 0 or more")
        if self.save_n_epoch_ratio is not None and self.save_n_epoch_ratio < 0:
            raise UserError(f"--save_n_epoch_ratio {self.save_n_epoch_ratio}: must be 0 (off) or more")
        if self.distributed.deepspeed and self.gradient_accumulation_steps > 1:
            raise UserError(
                f"--deepspeed with --gradient_accumulation_steps {self.gradient_accumulation_steps}: DeepSpeed "
                "accumulates inside its engine, which this trainer's loop does not drive; use 1 (raise "
                "--train_batch_size instead) or drop --deepspeed"
            )
        check_deepspeed(self.distributed)
        self.ema_settings.check()
        self.windows.windows()
        if self.backup_keep_last is not None and self.backup_every_n_minutes is None:
            raise UserError("--backup_keep_last needs --backup_every_n_minutes (it keeps only the newest backups)")
        if self.save_last_n_steps is not None and not self.save_every_n_steps:
            raise UserError("--save_last_n_steps needs --save_every_n_steps (it keeps only recent step saves)")
        if self.full_fp16 and self.mixed_precision != "fp16":
            raise UserError("--full_fp16 needs --mixed_precision fp16")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        if self.full_fp16 and self.full_bf16:
            raise UserError("--full_fp16 and --full_bf16 exclude each other; pick one")
        if self.fused_backward_pass and self.gradient_accumulation_steps > 1:
            raise UserError(
                f"--fused_backward_pass cannot accumulate gradients (--gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}): set it to 1 or drop --fused_backward_pass"
            )
        if self.max_data_loader_n_workers is not None and self.max_data_loader_n_workers < 0:
            raise UserError(f"--max_data_loader_n_workers {self.max_data_loader_n_workers}: must be 0 or more")

    @property
    def save_plan(self) -> SavePlan:
        return SavePlan(
            output_dir=self.output_dir,
            output_name=self.output_name,
            extension="" if self.save_model_as.startswith("diffusers") else "." + self.save_model_as,
            every_n_epochs=self.save_every_n_epochs,
            every_n_steps=self.save_every_n_steps,
            n_epoch_ratio=self.save_n_epoch_ratio or None,
            last_n_epochs=self.save_last_n_epochs,
            last_n_steps=self.save_last_n_steps,
            last_n_epochs_state=self.save_last_n_epochs_state,
            last_n_steps_state=self.save_last_n_steps_state,
            save_state=self.save_state,
            save_state_on_train_end=self.save_state_on_train_end,
        )


_PATH_FLAGS = ("output_dir", "resume", "logging_dir", "log_tracker_config")


def _loggable(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values trackers accept as hyperparameters (scalars; lists as text); secrets dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("wandb_api_key", "huggingface_token") or value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple, Path)):
            out[key] = str(value)
    return out
