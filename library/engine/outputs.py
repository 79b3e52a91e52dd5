"""What a run writes while it trains: model files, state folders and sample images, each with the weights meant
for it (the EMA with --ema, a schedule-free optimizer's average) and only from finite weights; saved files go on to
the Hugging Face Hub when a repository is set."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from library.engine.config import EngineConfig
from library.engine.ema import EMA_FILE, EmaWeights
from library.engine.parts import SampleRequest, TrainingParts
from library.engine.recipe import Recipe
from library.engine.report import SamplePoint, SampleRecord
from library.engine.step import TrainingDiverged, non_finite_weights_message, weights_finite
from library.hub import HubPublisher
from library.models.components import Components
from library.saving import remove_output
from library.state import Position, capture_rng, save_training_state, train_state_record

logger = logging.getLogger("sdtrain")


class RunOutputs:
    """Saves and samples for one run; every process calls each method (they synchronise), the main one writes.

    ``fingerprint`` is what a state must match to be resumed; ``trained_params`` are checked for NaN/inf before
    anything is written; ``optimizer`` is switched to its eval weights while models are saved or sampled when
    ``schedule_free``; ``ema`` (--ema) holds the averaged weights that are saved and sampled, and goes into states;
    ``publisher`` (main process, with --huggingface_repo_id) uploads what is saved. ``sample_points`` collects the
    samples made (main process), for the run's comparison grid."""

    def __init__(
        self,
        config: EngineConfig,
        accelerator: Accelerator,
        components: Components,
        recipe: Recipe,
        parts: TrainingParts,
        *,
        seed: int,
        fingerprint: dict[str, Any],
        trained_params: list[torch.nn.Parameter],
        optimizer: Any,
        schedule_free: bool,
        ema: EmaWeights | None = None,
        publisher: HubPublisher | None = None,
    ) -> None:
        self.config = config
        self.acc = accelerator
        self.components = components
        self.recipe = recipe
        self.parts = parts
        self.seed = seed
        self.fingerprint = fingerprint
        self.trained_params = trained_params
        self.optimizer = optimizer
        self.schedule_free = schedule_free
        self.ema = ema
        self.publisher = publisher
        self.sample_points: list[SamplePoint] = []

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """The weights to save and sample: the EMA's with --ema; schedule-free optimizers hold theirs (a running
        average) only in eval mode. Switched on every process, so their weights stay identical."""
        if self.ema is not None:
            with self.ema.applied():
                yield
            return
        if not self.schedule_free:
            yield
            return
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()

    def check_finite(self, step: int, path: Path) -> None:
        """Refuse to save ``path`` when a trained weight is NaN/inf (every process holds the same weights, so all
        stop together)."""
        if not weights_finite(self.trained_params):
            raise TrainingDiverged(non_finite_weights_message(step, path))

    def save_model(self, path: Path, *, epoch: int, step: int, stale: Path | None, final: bool = False) -> None:
        self.acc.wait_for_everyone()
        with self.eval_weights():
            self.check_finite(step, path)
            if self.acc.is_main_process:
                self.recipe.save(path, epoch=epoch, step=step, final=final)
                if self.publisher is not None:
                    self.publisher.publish(path, state=False)
                if remove_output(stale):
                    logger.info(f"removed old model {stale}")

    def save_state(self, path: Path, position: Position, stale: Path | None, *, publish: bool = True) -> None:
        """Write a state folder to resume ``position`` from (the EMA too); ``publish``: upload it with
        --save_state_to_huggingface (not for rolling backups)."""
        self.check_finite(position.global_step, path)
        record = train_state_record(
            position,
            seed=self.seed,
            num_processes=self.acc.num_processes,
            fingerprint=self.fingerprint,
            rng=capture_rng(),
        )
        tensors = {EMA_FILE: self.ema.tensors()} if self.ema is not None else None
        save_training_state(self.acc, path, record, tensors)
        if self.acc.is_main_process and publish and self.publisher is not None:
            self.publisher.publish(path, state=True)
        if self.acc.is_main_process and remove_output(stale):
            logger.info(f"removed old state {stale}")

    def sample(self, step: int, epoch: int | None) -> None:
        """Samples of the weights that are saved; with --sample_without_ema also of the raw ones (``_noema``)."""
        if self.parts.sample is None:
            return
        self.acc.wait_for_everyone()
        with self.eval_weights():
            if self.acc.is_main_process:
                self._sample_on_main(step, epoch, "")
        if self.ema is not None and self.config.ema_settings.sample_without_ema and self.acc.is_main_process:
            self._sample_on_main(step, epoch, "noema")
        self.acc.wait_for_everyone()

    def _sample_on_main(self, step: int, epoch: int | None, variant: str) -> None:
        request = SampleRequest(
            components=self.components,
            step=step,
            epoch=epoch,
            output_dir=self.config.output_dir,
            device=self.acc.device,
            accelerator=self.acc,
            variant=variant,
        )
        modules = self.recipe.trainable_modules()
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                samples = self.parts.sample(request)
            if samples and not variant:
                self.sample_points.append(SamplePoint(step, tuple(SampleRecord.of(s) for s in samples)))
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
