"""How many steps and epochs a run has, and which batches of an epoch each process trains on."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

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
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_process / self.accumulation)


def make_run_plan(
    batches_per_epoch: int,
    num_processes: int,
    accumulation: int,
    max_train_steps: int,
    max_train_epochs: int | None,
) -> RunPlan:
    if batches_per_epoch < 1:
        raise UserError("the dataset yields no batches: check --train_data_dir / --dataset_config and the image files")
    steps_per_epoch = math.ceil(math.ceil(batches_per_epoch / num_processes) / accumulation)
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


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose and position (e.g. noise, rank, epoch, batch), independent of any RNG state."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def step_generator(seed: int, *parts: object) -> torch.Generator:
    """A fresh CPU generator for one purpose and position, so a resumed run draws exactly the same numbers."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))
