"""Which images one epoch trains on, and how often: repeats, fractional repeats, OneTrainer's "samples" balancing
and regularization balancing.

Integer ``num_repeats`` behaves as in sd-scripts. A fractional value r gives floor(images x r) samples per epoch:
every image floor(r) times plus a different random choice of images for the remainder each epoch. Regularization
images are then repeated or cut so that an epoch holds as many reg samples as train samples, with sd-scripts'
loop (``DreamBoothDataset.__init__``): the first pass adds each reg image with its repeats until the train count is
reached, later passes add one more repeat per image in turn. A subset with ``samples_per_epoch`` N (OneTrainer's
``balancing_strategy = "samples"``) gives exactly N samples every epoch: N // images full passes plus a different
random choice, without replacement, of the N % images rest; a reg subset balanced this way keeps its N and is left
out of the reg balancing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from library.dataset.types import DatasetConfig, ImageRecord, SubsetConfig


def repeat_counts(count: int, repeats: float, rng: random.Random) -> list[int]:
    """How many times each of ``count`` images is used this epoch: floor(count x repeats) samples in total."""
    whole = math.floor(repeats)
    total = math.floor(round(count * repeats, 9))
    counts = [whole] * count
    for index in rng.sample(range(count), total - whole * count):
        counts[index] += 1
    return counts


def sample_counts(count: int, samples: int, rng: random.Random) -> list[int]:
    """How many times each of ``count`` images is used this epoch so the subset gives exactly ``samples``."""
    if count == 0:
        return []
    whole, rest = divmod(samples, count)
    counts = [whole] * count
    for index in rng.sample(range(count), rest):
        counts[index] += 1
    return counts


def samples_per_epoch(subset: SubsetConfig, count: int) -> int:
    """Samples of a subset of ``count`` images in each epoch before reg balancing (fractional repeats: floor)."""
    if subset.samples_per_epoch is not None:
        return subset.samples_per_epoch if count else 0
    return math.floor(round(count * subset.num_repeats, 9))


def describe_balancing(subset: SubsetConfig, count: int) -> str:
    """For the start-of-run summary: "3 images x 2 repeats = 6 samples/epoch" or "3 images -> 100 samples/epoch
    (balancing_strategy samples)" (before reg balancing)."""
    samples = samples_per_epoch(subset, count)
    if subset.samples_per_epoch is not None:
        return f"{count} images -> {samples} samples/epoch (balancing_strategy samples)"
    return f"{count} images x {subset.num_repeats:g} repeats = {samples} samples/epoch"


def balance_reg_counts(reg_counts: Sequence[int], num_train: int) -> list[int]:
    """sd-scripts' reg balancing: per reg image (in order) its repeats this epoch, so the sum reaches ``num_train``.

    The first pass takes images with their own repeats until ``num_train`` is reached (the last one whole, so the
    sum may overshoot; later images get 0). If the pass ends short, each image gets one more repeat in turn.
    """
    final = [0] * len(reg_counts)
    total = 0
    for index, count in enumerate(reg_counts):
        if total >= num_train:
            return final
        final[index] = count
        total += count
    if total < num_train and reg_counts:
        rounds, rest = divmod(num_train - total, len(reg_counts))
        final = [c + rounds + (1 if i < rest else 0) for i, c in enumerate(final)]
    return final


def epoch_samples(dataset: DatasetConfig, records: list[ImageRecord], epoch: int, seed: int) -> list[ImageRecord]:
    """The samples of ``epoch`` (a multiset, grouped by image; the loader shuffles). Same (seed, epoch), same list."""
    rng = random.Random(f"epoch-samples:{seed}:{epoch}")
    by_subset: dict[int, list[ImageRecord]] = {}
    for record in records:
        by_subset.setdefault(record.subset_index, []).append(record)

    train: list[tuple[ImageRecord, int]] = []
    reg: list[tuple[ImageRecord, int]] = []
    fixed: list[tuple[ImageRecord, int]] = []  # reg subsets balanced by sample count: not re-balanced
    for index in sorted(by_subset):
        subset = dataset.subsets[index]
        group = by_subset[index]
        if subset.samples_per_epoch is not None:
            counts = sample_counts(len(group), subset.samples_per_epoch, rng)
            target = fixed if subset.is_reg else train
        else:
            counts = repeat_counts(len(group), subset.num_repeats, rng)
            target = reg if subset.is_reg else train
        target.extend((record, count) for record, count in zip(group, counts) if count > 0)

    num_train = sum(count for _, count in train)
    reg_final = balance_reg_counts([count for _, count in reg], num_train)
    samples: list[ImageRecord] = []
    for record, count in train:
        samples.extend([record] * count)
    for (record, _), count in zip(reg, reg_final):
        samples.extend([record] * count)
    for record, count in fixed:
        samples.extend([record] * count)
    return samples
