"""What the loop needs from a dataset, and one DataLoader that serves every epoch's planned batches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class BatchSource(Protocol):
    """A dataset that plans each epoch's batches deterministically and loads one planned batch at a time.

    Epochs are counted from 1; ``load_batch`` may return None when none of the batch's images can be read.
    ``load_batch`` returns a dict with ``latents`` (unscaled, or None), ``images`` (in [-1, 1], or None),
    ``captions``, ``loss_weights``, ``alpha_masks`` (or None) and ``network_multipliers``.
    """

    def batch_plan(self, epoch: int) -> Sequence[Any]: ...

    def load_batch(self, plan: Any) -> dict[str, Any] | None: ...


class _PlannedBatches(Dataset):
    """Map-style view of a BatchSource whose keys are the plans themselves."""

    def __init__(self, source: BatchSource):
        self.source = source

    def __getitem__(self, plan: Any) -> dict[str, Any] | None:
        return self.source.load_batch(plan)


class _EpochPlans(Sampler):
    """Yields the plans of the epoch being trained; the loop swaps them in before each epoch, so one DataLoader
    (and, with persistent workers, one set of worker processes) serves the whole run."""

    def __init__(self) -> None:
        self.plans: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.plans))

    def __len__(self) -> int:
        return len(self.plans)


def loader_workers(workers: int | None, latents_cached: bool, cpu_count: int | None = None) -> int:
    """Worker processes for batch loading: --max_data_loader_n_workers capped at the CPU count; unset, none when
    latents are cached (a batch is a tensor lookup: workers only add start-up and copying) and otherwise sd-scripts'
    8, capped at the CPU count less one for the training process (the loop keeps such default workers persistent,
    since restarting them costs about a training step at every epoch)."""
    cpus = cpu_count or os.cpu_count() or 1
    if workers is not None:
        return min(workers, cpus)
    if latents_cached:
        return 0
    return max(0, min(8, cpus - 1))


class EpochLoader:
    """Loads each epoch's planned batches in order, in this process or in ``workers`` background processes.

    With ``persistent`` the workers are started once and kept across epochs (no restart stall at every epoch).
    The loader gets its own generator: by default each new iterator draws a seed from the global torch RNG, which
    would make a resumed run's random numbers differ from an uninterrupted one.
    """

    def __init__(self, source: BatchSource, workers: int, persistent: bool = False):
        self._plans = _EpochPlans()
        self.workers = workers
        self._loader: DataLoader | None = DataLoader(
            _PlannedBatches(source),
            batch_size=None,
            sampler=self._plans,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            collate_fn=_keep,
            generator=torch.Generator().manual_seed(0),
        )

    def epoch(self, plans: Sequence[Any]) -> Iterator[dict[str, Any] | None]:
        """The loaded batches of ``plans``, in order (None for a batch none of whose images could be read)."""
        if self._loader is None:
            raise RuntimeError("the loader was closed")
        self._plans.plans = list(plans)
        return iter(self._loader)

    def close(self) -> None:
        """Stop persistent workers (dropping the DataLoader ends them)."""
        self._loader = None


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
