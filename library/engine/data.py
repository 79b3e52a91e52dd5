"""What the loop needs from a dataset, and a DataLoader over one process's batches of an epoch."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


class BatchSource(Protocol):
    """A dataset that plans each epoch's batches deterministically and loads one planned batch at a time.

    Epochs are counted from 1; ``load_batch`` may return None when none of the batch's images can be read.
    ``load_batch`` returns a dict with ``latents`` (unscaled, or None), ``images`` (in [-1, 1], or None),
    ``captions``, ``loss_weights``, ``alpha_masks`` (or None) and ``network_multipliers``.
    """

    def batch_plan(self, epoch: int) -> Sequence[Any]: ...

    def load_batch(self, plan: Any) -> dict[str, Any] | None: ...


class _PlannedBatches(Dataset):
    def __init__(self, source: BatchSource, plans: Sequence[Any]):
        self.source = source
        self.plans = list(plans)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.source.load_batch(self.plans[index])


def batch_loader(source: BatchSource, plans: Sequence[Any], workers: int | None) -> DataLoader:
    """Load ``plans`` in order; ``workers`` background processes (None or 0: load in this process).

    The loader gets its own generator: by default each new iterator draws a seed from the global torch RNG, which
    would make a resumed run's random numbers differ from an uninterrupted one.
    """
    count = min(workers or 0, os.cpu_count() or 1)
    return DataLoader(
        _PlannedBatches(source, plans),
        batch_size=None,
        shuffle=False,
        num_workers=count,
        persistent_workers=False,
        collate_fn=_keep,
        generator=torch.Generator().manual_seed(0),
    )


def _keep(batch: dict[str, Any] | None) -> dict[str, Any] | None:
    if batch is None:
        return None
    return {k: torch.from_numpy(v) if hasattr(v, "__array_interface__") else v for k, v in batch.items()}


def dataset_fingerprint(source: BatchSource, batches_per_epoch: int) -> dict[str, Any]:
    """Identifies the dataset a state was trained on: the dataset's own fingerprint when it offers one."""
    own = getattr(source, "fingerprint", None)
    if callable(own):
        return {"batches_per_epoch": batches_per_epoch, "dataset": own()}
    digest = hashlib.sha256(repr(list(source.batch_plan(1))).encode()).hexdigest()[:16]
    return {"batches_per_epoch": batches_per_epoch, "epoch_plan": digest}
