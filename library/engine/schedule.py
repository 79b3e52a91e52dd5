"""How many steps and epochs a run has, and which batches of an epoch each process trains on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from library.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class RunPlan:
    """Step arithmetic of one run, as sd-scripts does it: ``--max_train_epochs`` wins over ``--max_train_steps``."""

    batches_per_epoch: int
    num_processes: int
    accumulation: int
    max_train_steps: int
    num_epochs: int

    @property
    def batches_per_process(self) -> int:
        return math.ceil(self.batches_per_epoch / self.num_processes)

    @property
    def batches_per_step(self) -> int:
        """Batches of all processes that make one optimizer step."""
        return self.num_processes * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_for(self.batches_per_epoch)

    def steps_for(self, batches: int) -> int:
        """Optimizer steps an epoch of ``batches`` batches makes in this run."""
        return steps_in_epoch(batches, self.num_processes, self.accumulation)


def steps_in_epoch(batches: int, num_processes: int, accumulation: int) -> int:
    """Optimizer steps of an epoch of ``batches``: each process takes every N-th batch and accumulates
    ``accumulation`` of them into one step, a short group at the epoch's end included."""
    return math.ceil(math.ceil(batches / num_processes) / accumulation)


def make_run_plan(
    batches_per_epoch: int,
    num_processes: int,
    accumulation: int,
    max_train_steps: int,
    max_train_epochs: int | None,
) -> RunPlan:
    """The run's one step plan, made once at start-up from epoch 1's batches (sd-scripts' arithmetic)."""
    if batches_per_epoch < 1:
        raise UserError("the dataset yields no batches: check --train_data_dir / --dataset_config and the image files")
    steps_per_epoch = steps_in_epoch(batches_per_epoch, num_processes, accumulation)
    if max_train_epochs is not None:
        max_train_steps = max_train_epochs * steps_per_epoch
    return RunPlan(
        batches_per_epoch=batches_per_epoch,
        num_processes=num_processes,
        accumulation=accumulation,
        max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / steps_per_epoch),
    )


def shard(items: Sequence[T], rank: int, num_processes: int) -> list[T]:
    """This process's share of an epoch's batches, interleaved; shorter shares wrap round so all are equal."""
    per_process = math.ceil(len(items) / num_processes)
    return [items[(rank + i * num_processes) % len(items)] for i in range(per_process)]
