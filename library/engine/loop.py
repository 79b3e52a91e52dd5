"""The one training loop every entry script uses; a Recipe says what is trained, TrainingParts how a step works."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from library.engine.backups import Every, backup_state, backups_to_remove
from library.engine.config import EngineConfig
from library.engine.data import BatchSource, EpochLoader, dataset_fingerprint, loader_workers
from library.engine.ema import EMA_FILE, EmaWeights
from library.engine.interrupts import StopSignals, TrainingInterrupted, remove_run_temporaries, stop_message
from library.engine.outputs import RunOutputs
from library.engine.parts import TrainingParts
from library.engine.placement import PRECISION, allow_fp16_unscaling, fuse_backward, grad_zeroer, place_models
from library.engine.recipe import Recipe
from library.engine.report import RunReport, write_report, write_sample_grid
from library.engine.schedule import RunPlan, make_run_plan, shard
from library.engine.step import TrainingDiverged, batch_loss, divergence_message
from library.engine.tracking import LossRecorder, make_accelerator, release_accelerator, start_trackers, step_logs
from library.engine.validation import ValidationSettings, Validator
from library.engine.windows import TrainingWindows
from library.errors import UserError
from library.hub import HubPublisher
from library.models.components import Components
from library.optimizers import is_schedule_free
from library.saving import last_stem, remove_output
from library.seeds import step_generator
from library.state import (
    Position,
    check_fingerprint,
    load_training_state,
    position_from_step,
    read_train_state,
    restore_rng,
    saved_position,
)

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class TrainResult:
    global_step: int
    epochs: int
    final_model: Path | None
    skipped_steps: int = 0
    plan: RunPlan | None = None


@dataclass
class _Progress:
    """Mutable counters of the running loop (kept in one place, never global)."""

    global_step: int
    epoch: int = 0
    batches_done: int = 0
    skipped_steps: int = 0
    group_losses: list[float] = field(default_factory=list)
    group_bad: bool = False
    group_latents_finite: bool = True


def train(
    config: EngineConfig,
    components: Components,
    dataset: BatchSource,
    recipe: Recipe,
    parts: TrainingParts,
    *,
    tracker_name: str = "network_train",
    summary: str | None = None,
    plan: RunPlan | None = None,
    validator: Validator | None = None,
    validating: ValidationSettings = ValidationSettings(),
) -> TrainResult:
    """Train ``recipe``'s weights on ``dataset``; writes models and states under ``config.output_dir``.

    ``plan`` is the run's step plan, made once at start-up (``library.engine.launch``); without one (tests that
    build a source by hand) it is made here from the source's first epoch. ``validator`` computes the validation
    loss on held-out images when ``validating`` says.

    SIGINT and SIGTERM stop training after the current optimizer step, save a state to resume from and raise
    :class:`TrainingInterrupted`, which exits with 128 + the signal number."""
    accelerator = make_accelerator(config)
    run = _Run(config, accelerator, components, dataset, recipe, parts, tracker_name, summary, plan)
    run.validator, run.validating = validator, validating
    try:
        with StopSignals() as signals:
            run.signals = signals
            return run.run()
    except TrainingInterrupted as stopped:
        if accelerator.is_main_process:
            logger.warning(stopped.message)
        raise
    finally:
        run.remove_hooks()
        if run.publisher is not None:
            run.publisher.close()
        release_accelerator(accelerator)


class _Run:
    def __init__(self, config, accelerator, components, dataset, recipe, parts, tracker_name, summary, plan):
        self.config: EngineConfig = config
        self.acc: Accelerator = accelerator
        self.components: Components = components
        self.dataset: BatchSource = dataset
        self.recipe: Recipe = recipe
        self.parts: TrainingParts = parts
        self.tracker_name = tracker_name
        self.summary = summary
        self.plan: RunPlan | None = plan
        self.saves = config.save_plan
        self.backup_clock = Every(config.backup_every_n_minutes)
        self.sample_clock = Every(config.sample_every_n_minutes)
        self.hook_handles: list[Any] = []
        self.signals = StopSignals()
        self.validator: Validator | None = None
        self.validating = ValidationSettings()
        self.validation_loss: float | None = None
        self.windows_reported = False
        self.publisher: HubPublisher | None = None
        if config.hub.huggingface_repo_id and accelerator.is_main_process:
            self.publisher = HubPublisher(config.hub)

    def remove_hooks(self) -> None:
        """Take the fused backward pass's hooks off the parameters (after training, and when it fails)."""
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []

    def run(self) -> TrainResult:
        config, acc = self.config, self.acc
        if acc.is_main_process:
            remove_run_temporaries(config.output_dir)
        acc.wait_for_everyone()
        resume_data = read_train_state(config.resume) if config.resume else None
        if config.seed is None:
            raise ValueError("EngineConfig.seed is chosen once, before the run (library.seeds.resolve_seed)")
        self.seed = config.seed
        set_seed(self.seed)
        self.weight_dtype = PRECISION[config.mixed_precision]
        self.models = place_models(config, self.components, self.recipe, acc.device, self.weight_dtype)
        self.plan = self.plan or make_run_plan(
            len(self.dataset.batch_plan(1)),
            acc.num_processes,
            config.gradient_accumulation_steps,
            config.max_train_steps,
            config.max_train_epochs,
        )
        if self.plan.num_processes != acc.num_processes:
            raise ValueError(f"the run was planned for {self.plan.num_processes} processes, {acc.num_processes} run")
        self.saves = config.save_plan.for_epochs(self.plan.num_epochs)
        modules = self.recipe.trainable_modules()
        if config.full_fp16 or config.full_bf16:
            for module in modules:
                module.to(self.weight_dtype)
        groups = self.recipe.param_groups()
        self.group_names = groups.names
        optimizer, self.lr_scheduler = self.parts.make_optimizer(groups.groups, self.plan.max_train_steps)
        self.recipe.begin(self.plan, self.seed, optimizer)
        prepared = acc.prepare(*modules, optimizer)
        self.optimizer = prepared[-1]
        self.zero_grad = grad_zeroer(self.optimizer)
        if config.full_fp16 and acc.scaler is not None:
            allow_fp16_unscaling(acc.scaler)
        self.trained_params = [p for m in modules for p in m.parameters() if p.requires_grad]
        schedule_free = is_schedule_free(optimizer)
        if config.fused_backward_pass:
            self.hook_handles = fuse_backward(config, acc, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        self.fingerprint = {
            "run": {"seed": self.seed},
            "network": self.recipe.fingerprint(),
            "dataset": dataset_fingerprint(self.dataset, self.plan.batches_per_epoch),
        }
        position = self._start_position(resume_data)
        ema = self._make_ema(schedule_free)
        self.out = RunOutputs(
            config,
            acc,
            self.components,
            self.recipe,
            self.parts,
            seed=self.seed,
            fingerprint=self.fingerprint,
            trained_params=self.trained_params,
            optimizer=self.optimizer,
            schedule_free=schedule_free,
            ema=ema,
            publisher=self.publisher,
        )
        windows = config.windows.windows()
        parts = self.recipe.part_parameters() if windows else {}
        self.windows = TrainingWindows(windows, parts, self.plan.steps_per_epoch, self.trained_params)
        if schedule_free:
            self.optimizer.train()
        start_trackers(acc, config, self.tracker_name)
        self._log_summary(position)
        return self._loop(position)

    def _make_ema(self, schedule_free: bool) -> EmaWeights | None:
        """--ema: the average starts from the trained weights as they are now (after a resume, the state's), and
        takes the state's average when it has one."""
        settings = self.config.ema_settings
        if not settings.ema:
            return None
        if schedule_free:
            raise UserError(
                "--ema with a schedule-free optimizer: its eval weights are already an average of the training "
                "weights; drop --ema or pick another optimizer"
            )
        ema = EmaWeights(self.trained_params, settings)
        resume = self.config.resume
        if resume is not None and not ema.load(resume):
            logger.warning(f"--ema: {resume} has no {EMA_FILE}; the average starts from the resumed weights")
        return ema

    def _start_position(self, resume_data: dict[str, Any] | None) -> Position:
        config, plan = self.config, self.plan
        position = Position()
        if resume_data is not None:
            check_fingerprint(resume_data, self.fingerprint, config.resume)
            load_training_state(self.acc, config.resume)
            if self.acc.num_processes == 1 and resume_data.get("rng"):
                restore_rng(resume_data["rng"])
            position = saved_position(resume_data, self.acc.num_processes, plan.steps_per_epoch, plan.accumulation)
            logger.info(f"resuming from {config.resume} at step {position.global_step}")
        if config.initial_epoch is not None or config.initial_step is not None:
            if config.initial_epoch is not None:
                step = max(config.initial_epoch - 1, 0) * plan.steps_per_epoch
            else:
                step = config.initial_step or 0
            position = position_from_step(step, plan.steps_per_epoch, plan.accumulation, config.skip_until_initial_step)
        return position

    def _log_summary(self, position: Position) -> None:
        if not self.acc.is_main_process:
            return
        plan = self.plan
        lines = [self.summary] if self.summary else []
        lines += [
            f"batches per epoch: {plan.batches_per_epoch} ({plan.batches_per_process} per process, "
            f"{plan.num_processes} process(es)), gradient accumulation: {plan.accumulation}, "
            f"steps per epoch: {plan.steps_per_epoch}",
            f"training {plan.max_train_steps} steps in {plan.num_epochs} epoch(s), seed {self.seed}"
            + (f", starting at step {position.global_step}" if position.global_step else ""),
            f"output: {self.config.output_dir}",
        ]
        for line in lines:
            logger.info(line)

    def _loop(self, position: Position) -> TrainResult:
        config, acc, plan = self.config, self.acc, self.plan
        progress = _Progress(global_step=position.global_step, epoch=position.epoch, batches_done=position.batches_done)
        self.recorder = LossRecorder(steps_per_epoch=plan.steps_per_epoch)
        self.started = time.monotonic()
        bar = tqdm(
            total=plan.max_train_steps,
            initial=position.global_step,
            disable=not acc.is_main_process,
            desc="steps",
            dynamic_ncols=True,
        )
        if progress.global_step == 0 and config.sample_at_first:
            self.out.sample(0, 0)
        workers = loader_workers(config.max_data_loader_n_workers, config.latents_cached)
        if config.persistent_data_loader_workers and workers == 0 and acc.is_main_process:
            logger.info("--persistent_data_loader_workers has no effect: batches are loaded in the training process")
        persistent = config.persistent_data_loader_workers or config.max_data_loader_n_workers is None
        self.loader = EpochLoader(self.dataset, workers, persistent=persistent)
        try:
            for epoch in range(position.epoch, plan.num_epochs):
                if progress.global_step >= plan.max_train_steps or self._windows_ended(progress.global_step):
                    break
                start = position.batches_done if epoch == position.epoch else 0
                if self._train_epoch(epoch, start, progress, bar):
                    progress.epoch, progress.batches_done = epoch + 1, 0
                self._end_epoch(epoch, progress)
        finally:
            bar.close()
            self.loader.close()
        return self._finish(progress)

    def _train_epoch(self, epoch: int, start: int, progress: _Progress, bar: tqdm) -> bool:
        """Train on the rest of ``epoch`` from batch ``start``; False when --max_train_steps ends it early."""
        acc, plan = self.acc, self.plan
        self.recipe.on_epoch_start(epoch)
        batches = shard(self.dataset.batch_plan(epoch + 1), acc.process_index, acc.num_processes)
        accumulation = plan.accumulation
        for offset, batch in enumerate(self.loader.epoch(batches[start:])):
            index = start + offset
            group_start = index - index % accumulation
            group_end = min(group_start + accumulation, len(batches))
            if offset == 0 or index == group_start:
                self.recipe.on_step_start(progress.global_step)
                self.windows.on_step_start(progress.global_step)
            if batch is None:
                logger.warning(f"epoch {epoch + 1}, batch {index + 1}: no image of this batch could be read")
            else:
                self._micro_step(batch, epoch, index, group_end - group_start, progress)
            if index + 1 < group_end:
                continue
            self._optimizer_step(epoch, index, progress)
            progress.epoch, progress.batches_done = epoch, index + 1
            # the postfix is drawn with the bar, which tqdm redraws at most every mininterval; the last step always
            bar.set_postfix(self._postfix(), refresh=False)
            bar.update(1)
            if progress.global_step >= plan.max_train_steps:
                bar.refresh()
            self._after_step(epoch, index + 1, progress)
            if self.validator is not None and self.validating.due_after_step(progress.global_step):
                self._validate(progress.global_step, bar)
            signum = self._stop_signal()
            if signum:
                raise self._interrupted(signum, Position(progress.global_step, epoch, index + 1))
            if progress.global_step >= plan.max_train_steps and index + 1 < len(batches):
                return False
            if self._windows_ended(progress.global_step):
                return index + 1 == len(batches)
        return True

    def _windows_ended(self, step: int) -> bool:
        """Whether every trained part's window (--*_train_until) has ended: training stops there."""
        if not self.windows.all_ended(step):
            return False
        if self.acc.is_main_process and not self.windows_reported:
            self.windows_reported = True
            logger.info(f"every trained part's window has ended at step {step}: nothing is left to train, stopping")
        return True

    def _micro_step(self, batch: dict[str, Any], epoch: int, index: int, group_size: int, progress: _Progress) -> None:
        self.recipe.on_batch(batch)
        global_index = index * self.acc.num_processes + self.acc.process_index
        generator = step_generator(self.seed, "batch", epoch, global_index)
        result = batch_loss(
            batch,
            models=self.models,
            parts=self.parts,
            autocast=self.acc.autocast(),
            generator=generator,
            device=self.acc.device,
            weight_dtype=self.weight_dtype,
            train_text_encoder=self.recipe.train_text_encoder and self.windows.trains("text_encoder"),
            step=progress.global_step,
        )
        if not torch.isfinite(result.loss):
            progress.group_bad = True
            progress.group_latents_finite &= result.latents_finite
            return
        self.acc.backward(result.loss / group_size)
        progress.group_losses.append(float(result.loss.detach()))

    def _optimizer_step(self, epoch: int, index: int, progress: _Progress) -> None:
        acc = self.acc
        if acc.num_processes > 1:
            for p in self.trained_params:
                if p.grad is not None:
                    p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
        bad = self._any_process(progress.group_bad)
        what = "loss became NaN/inf"
        fused = self.config.fused_backward_pass
        if not bad and not fused and self.config.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.trained_params, self.config.max_grad_norm)
            if acc.scaler is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                bad, what = True, "gradient norm became NaN/inf"
        step = progress.global_step + 1
        if bad:
            message = divergence_message(
                what,
                step,
                epoch,
                index,
                progress.group_latents_finite,
                self.config.mixed_precision,
                self.config.no_half_vae,
            )
            if self.config.nan_policy == "stop":
                raise TrainingDiverged(message)
            logger.warning(f"skipping optimizer step: {message.split('. Training stopped')[0]}")
            progress.skipped_steps += 1
        else:
            if not fused:
                self.optimizer.step()
            self.lr_scheduler.step()
        self.zero_grad()
        extra = {} if bad else self.recipe.after_optimizer_step(acc.device)
        if not bad and self.out.ema is not None:
            self.out.ema.update(step)
        progress.global_step = step
        losses = progress.group_losses
        loss = sum(losses) / len(losses) if losses else float("nan")
        progress.group_losses, progress.group_bad, progress.group_latents_finite = [], False, True
        if losses:
            self.recorder.add(loss)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        acc.log({**step_logs(loss, self.recorder.average, lrs, self.group_names), **extra}, step=step)

    def _stop_signal(self) -> int:
        """The signal that asked training to stop on any process (0: none), so that all processes stop together."""
        signum = self.signals.signum or 0
        if self.acc.num_processes == 1:
            return signum
        return int(self.acc.gather(torch.tensor([signum], device=self.acc.device)).max().item())

    def _interrupted(self, signum: int, position: Position) -> TrainingInterrupted:
        """Save the state to resume from ``position`` (unless this step's periodic save wrote it already), with or
        without --save_state, and say how training stopped and where the state went."""
        saves, step = self.saves, position.global_step
        state = saves.step_state(step)
        if not (saves.save_state and saves.saves_at_step(step)):
            self.out.save_state(state, position, None)
        return TrainingInterrupted(signum, stop_message(signum, step, state))

    def _postfix(self) -> dict[str, str]:
        """The progress bar's figures: the running average loss and the last validation loss."""
        figures = {"avr_loss": f"{self.recorder.average:.4f}"}
        if self.validation_loss is not None:
            figures["val_loss"] = f"{self.validation_loss:.4f}"
        return figures

    def _validate(self, step: int, bar: tqdm | None) -> None:
        """Log the validation loss of the raw (trained) weights per subset and overall."""
        values = self.validator.run(
            self.models,
            self.parts,
            device=self.acc.device,
            weight_dtype=self.weight_dtype,
            autocast=self.acc.autocast,
            step=step,
            modules=self.recipe.trainable_modules(),
        )
        if "" not in values:
            return
        self.validation_loss = values[""]
        logs = {f"loss/validation/{name}": value for name, value in values.items() if name}
        self.acc.log({"loss/validation": values[""], **logs}, step=step)
        if bar is not None:
            bar.set_postfix(self._postfix(), refresh=False)

    def _any_process(self, flag: bool) -> bool:
        if self.acc.num_processes == 1:
            return flag
        total = self.acc.reduce(torch.tensor([1.0 if flag else 0.0], device=self.acc.device), reduction="sum")
        return bool(total.item() > 0)

    def _after_step(self, epoch: int, batches_done: int, progress: _Progress) -> None:
        step, saves = progress.global_step, self.saves
        if saves.saves_at_step(step):
            self.out.save_model(saves.step_model(step), epoch=epoch, step=step, stale=saves.stale_step_model(step))
            if saves.save_state:
                self.out.save_state(
                    saves.step_state(step), Position(step, epoch, batches_done), saves.stale_step_state(step)
                )
        if self.config.sample_every_n_epochs is None and self.config.sample_every_n_steps:
            if step % self.config.sample_every_n_steps == 0:
                self.out.sample(step, None)
        if self.config.backup_every_n_minutes and self._any_process(self.backup_clock.due()):
            backup = backup_state(self.config.output_dir, self.config.output_name, step)
            self.out.save_state(backup, Position(step, epoch, batches_done), None, publish=False)
            for old in backups_to_remove(self.config.output_dir, self.config.output_name, self.config.backup_keep_last):
                if self.acc.is_main_process and remove_output(old):
                    logger.info(f"removed old backup {old}")
            self.backup_clock.reset()
        if self.config.sample_every_n_minutes and self._any_process(self.sample_clock.due()):
            self.out.sample(step, None)
            self.sample_clock.reset()

    def _end_epoch(self, epoch: int, progress: _Progress) -> None:
        epoch_no, step, saves = epoch + 1, progress.global_step, self.saves
        self.acc.log({"loss/epoch": self.recorder.end_epoch()}, step=epoch_no)
        self.acc.wait_for_everyone()
        if saves.saves_at_epoch_end(epoch_no, self.plan.num_epochs):
            self.out.save_model(
                saves.epoch_model(epoch_no), epoch=epoch_no, step=step, stale=saves.stale_epoch_model(epoch_no)
            )
            if saves.save_state:
                self.out.save_state(
                    saves.epoch_state(epoch_no), Position(step, epoch_no, 0), saves.stale_epoch_state(epoch_no)
                )
        if self.config.sample_every_n_epochs and epoch_no % self.config.sample_every_n_epochs == 0:
            self.out.sample(step, epoch_no)
        if self.validator is not None and self.validating.due_after_epoch(epoch_no):
            self._validate(step, None)

    def _finish(self, progress: _Progress) -> TrainResult:
        saves, step = self.saves, progress.global_step
        final_epoch = self.plan.num_epochs
        self._check_processes_agree()
        if saves.save_state or saves.save_state_on_train_end:
            self.out.save_state(saves.last_state(), Position(step, progress.epoch, progress.batches_done), None)
        self.out.save_model(saves.last_model(), epoch=final_epoch, step=step, stale=None, final=True)
        if self.acc.is_main_process:
            self._report(step, final_epoch)
        return TrainResult(
            global_step=step,
            epochs=final_epoch,
            final_model=saves.last_model(),
            skipped_steps=progress.skipped_steps,
            plan=self.plan,
        )

    def _report(self, step: int, epochs: int) -> None:
        """The comparison grid of the samples, and the report of the run (written, and logged line by line)."""
        config, saves = self.config, self.saves
        samples, name = config.output_dir / "sample", last_stem(config.output_name)
        report = RunReport(
            steps=step,
            epochs=epochs,
            seconds=time.monotonic() - self.started,
            loss=self.recorder.span,
            model=saves.last_model(),
            state=saves.last_state() if saves.save_state or saves.save_state_on_train_end else None,
            samples=samples if self.out.sample_points else None,
            grid=write_sample_grid(self.out.sample_points, samples, name),
            logs=config.logging_dir,
        )
        for line in write_report(report, config.output_dir / f"{name}_report.txt"):
            logger.info(line)

    def _check_processes_agree(self) -> None:
        """With several processes, every one must end with the same weights (a cheap checksum comparison)."""
        acc = self.acc
        if acc.num_processes == 1:
            return
        with torch.no_grad():
            local = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in self.trained_params])
        gathered = acc.gather(local.to(acc.device).unsqueeze(0))
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError("the processes ended training with different weights; please report this")
        if acc.is_main_process:
            logger.info(f"all {acc.num_processes} processes hold identical trained weights")
