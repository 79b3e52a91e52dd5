"""The held-out validation images: which images of each subset are never trained on, the subsets' readable names,
and the validation copy of a dataset's settings with every random augmentation off.

The selection is a pure function of the subset's image paths, its name, ``validation_split`` and
``validation_seed`` (default :data:`DEFAULT_VALIDATION_SEED`, never the training ``--seed``), so changing the
training seed or the scan order does not change the held-out set.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

from library.dataset.types import PIXEL_AUGMENT_KEYS, DatasetConfig, ImageRecord, SubsetConfig
from library.errors import UserError
from library.seeds import derive_seed

DEFAULT_VALIDATION_SEED = 20250101  # used when validation_seed is unset; fixed so --seed does not move the split


def subset_names(datasets: Sequence[DatasetConfig]) -> list[list[str]]:
    """A readable name per subset: its image_dir folder name, else its metadata file's stem; a name already taken
    (across all datasets, in order) gets a suffix `` (2)``, `` (3)``, ... (as ss_dataset_dirs names them)"""
    taken: set[str] = set()
    out: list[list[str]] = []
    for dataset in datasets:
        names = []
        for subset in dataset.subsets:
            if subset.image_dir is not None:
                base = subset.image_dir.name or str(subset.image_dir)
            elif subset.metadata_file is not None:
                base = subset.metadata_file.stem
            else:
                base = subset.name
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base} ({n})"
            taken.add(name)
            names.append(name)
        out.append(names)
    return out


def held_out_count(count: int, split: float) -> int:
    """How many of a subset's ``count`` images ``split`` holds out: the rounded fraction, at least 1 when the
    fraction is above 0 and the subset has 2 or more images, and never all of them."""
    if split <= 0 or count < 2:
        return 0
    return min(max(round(count * split), 1), count - 1)


def held_out_paths(records: Sequence[ImageRecord], split: float, seed: int, name: str) -> set[str]:
    """The paths of the images of one subset held out for validation: a shuffle of the sorted paths seeded by
    ``seed`` and the subset's ``name``, cut at :func:`held_out_count`."""
    paths = sorted({str(r.path) for r in records})
    random.Random(derive_seed(seed, "validation", name)).shuffle(paths)
    return set(paths[: held_out_count(len(paths), split)])


def validation_subset(subset: SubsetConfig) -> SubsetConfig:
    """``subset`` as validation loads it: each image once, the full caption, and no random augmentation (no flip,
    random crop, colour, rotation or jitter, caption shuffle, dropout or token warm-up)."""
    return dataclasses.replace(
        subset,
        num_repeats=1,
        samples_per_epoch=None,
        flip_aug=False,
        random_crop=False,
        color_aug=False,
        face_crop_aug_range=None,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
        token_warmup_min=1,
        token_warmup_step=0,
        **{key: 0.0 for key in PIXEL_AUGMENT_KEYS},
    )


def validation_seed(dataset: DatasetConfig) -> int:
    """The dataset's validation_seed, else :data:`DEFAULT_VALIDATION_SEED`."""
    return DEFAULT_VALIDATION_SEED if dataset.validation_seed is None else dataset.validation_seed


@dataclass(frozen=True)
class Part:
    """Datasets with their records and subset names (one list per dataset)."""

    datasets: list[DatasetConfig]
    records: list[list[ImageRecord]]
    names: list[list[str]]

    @property
    def images(self) -> int:
        return sum(len(r) for r in self.records)


@dataclass(frozen=True)
class Split:
    """The training part (is_val subsets removed, indices renumbered) and the validation part (None when nothing
    is held out); the validation datasets keep all their subsets, with :func:`validation_subset` settings."""

    train: Part
    validation: Part | None


def split_records(
    datasets: Sequence[DatasetConfig], records: Sequence[Sequence[ImageRecord]], names: Sequence[Sequence[str]]
) -> Split:
    """Hold out each dataset's ``validation_split`` of every non-regularization subset (regularization images are
    never held out, as in sd-scripts) and every image of ``is_val`` subsets."""
    train = Part([], [], [])
    validation = Part([], [], [])
    for dataset, recs, dataset_names in zip(datasets, records, names):
        seed = validation_seed(dataset)
        held: set[tuple[int, str]] = set()  # (subset index, path)
        for s, subset in enumerate(dataset.subsets):
            own = [r for r in recs if r.subset_index == s]
            if subset.is_val:
                held.update((s, str(r.path)) for r in own)
            elif not subset.is_reg and dataset.validation_split > 0:
                held.update((s, p) for p in held_out_paths(own, dataset.validation_split, seed, dataset_names[s]))
        kept = [s for s, subset in enumerate(dataset.subsets) if not subset.is_val]
        if kept:
            renumber = {old: new for new, old in enumerate(kept)}
            train.datasets.append(dataclasses.replace(dataset, subsets=tuple(dataset.subsets[s] for s in kept)))
            train.records.append(
                [
                    dataclasses.replace(r, subset_index=renumber[r.subset_index])
                    for r in recs
                    if (r.subset_index, str(r.path)) not in held and r.subset_index in renumber
                ]
            )
            train.names.append([dataset_names[s] for s in kept])
        val_records = [r for r in recs if (r.subset_index, str(r.path)) in held]
        if val_records:
            subsets = tuple(validation_subset(s) for s in dataset.subsets)
            validation.datasets.append(dataclasses.replace(dataset, subsets=subsets))
            validation.records.append(val_records)
            validation.names.append(list(dataset_names))
    if not train.datasets or not train.images:
        raise UserError(
            "every image is held out for validation (is_val = true on every subset, or nothing left after "
            "validation_split): keep at least one training subset"
        )
    return Split(train, validation if validation.datasets else None)
