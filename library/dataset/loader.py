"""The training dataset: bucket assignment, a deterministic batch plan per epoch, and batch loading.

``batch_plan(epoch)`` is a pure function of (seed, epoch) and the scanned records, and ``load_batch(plan)`` depends
only on the plan and the seed (every random choice uses a generator derived from seed, epoch, batch and item), so
DataLoader workers give the same batches as the main process and resuming at batch k of an epoch is
``batch_plan(epoch)[k:]``. Epochs are counted from 1, as sd-scripts does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import random
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from library.config.dataset_config import DatasetFlags, load_dataset_configs
from library.config.dataset_schema import clip
from library.dataset.buckets import (
    BucketAssignment,
    BucketSettings,
    cover_size,
    crop_top_left,
    make_bucket_resolutions,
    select_bucket,
)
from library.dataset.buckets import validate_settings as validate_bucket_settings
from library.dataset.captions import pick_caption, process_caption
from library.dataset.epoch import epoch_samples
from library.dataset.images import ImageLoadError, Jitter, check_interpolation, prepare_image
from library.dataset.latent_cache import (
    NPZ_SUFFIX,
    CacheJob,
    LatentEntry,
    cache_latents_shared,
    frozen_by_cache,
    load_entry,
    prepared_problem,
    refuse_incompatible,
    vae_fingerprint,
)
from library.dataset.scan import scan_dataset
from library.dataset.types import DatasetConfig, ImageRecord
from library.dataset.validation import split_records
from library.dataset.validation import subset_names as subset_names_of
from library.dataset.validation import validation_seed as validation_seed_of
from library.errors import UserError

if TYPE_CHECKING:
    from library.engine.schedule import RunPlan
from library.seeds import derive_seed

logger = logging.getLogger("sdtrain.dataset")
_CHECK_THREADS = 4  # prepared npz files checked at once (reading and hashing images)
_SHOWN = 5  # prepared files named one by one in warnings


@dataclass(frozen=True)
class BatchPlan:
    """One batch: images ``items`` (indices into the dataset's records) of one bucket, and where it sits in the
    run. ``global_step`` is the optimizer step the batch is trained in, as sd-scripts counts it for token warm-up."""

    epoch: int
    index: int
    dataset_index: int
    bucket: tuple[int, int]
    items: tuple[int, ...]
    global_step: int


class TrainDataset:
    """Datasets with their scanned records, bucket assignments and optional latent cache (read-only after init)."""

    def __init__(
        self,
        datasets: Sequence[DatasetConfig],
        records: Sequence[Sequence[ImageRecord]],
        *,
        seed: int,
        prior_loss_weight: float = 1.0,
        latents: dict[tuple[int, int], LatentEntry | Path] | None = None,
        skipped: Sequence[tuple[Path, str]] = (),
        plan: RunPlan | None = None,
        subset_names: Sequence[Sequence[str]] | None = None,
    ):
        if len(datasets) != len(records):
            raise ValueError("one records list per dataset is needed")
        self.datasets = list(datasets)
        # readable names per subset (batch["subsets"]; validation.subset_names), kept by the validation split
        self.subset_names = [list(n) for n in subset_names] if subset_names is not None else subset_names_of(datasets)
        self.records = [list(r) for r in records]
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.latents = latents
        self.skipped: list[tuple[Path, str]] = list(skipped)
        self.plan = (
            plan  # the run's step plan (library.engine.schedule); None before it is made: one process, no accumulation
        )
        self.assignments: list[list[BucketAssignment]] = []
        for dataset, recs in zip(self.datasets, self.records):
            settings = BucketSettings.from_dataset(dataset)
            validate_bucket_settings(settings, dataset.name)
            check_interpolation(dataset.resize_interpolation, f"{dataset.name}: resize_interpolation")
            table = make_bucket_resolutions(settings) if settings.enable_bucket and not settings.no_upscale else None
            self.assignments.append(
                [
                    BucketAssignment(r.bucket, cover_size(r.size, r.bucket))
                    if r.bucket is not None
                    else select_bucket(r.size, settings, table)
                    for r in recs
                ]
            )
        self._epoch_lengths: dict[int, int] = {}
        self._warned: set[Path] = set()

    @classmethod
    def from_settings(
        cls,
        flags: DatasetFlags,
        allowed_styles: set[str],
        *,
        seed: int,
    ) -> TrainDataset:
        """Flags/TOML -> dataset configs -> scanned records -> a dataset with buckets (no latents yet).

        ``seed`` is the run's one seed. A ``--dataset_class`` subclass may override this to find its images
        another way (it must still return an instance of itself).
        """
        datasets = load_dataset_configs(flags, allowed_styles)
        scans = [scan_dataset(d) for d in datasets]
        records = [s.records for s in scans]
        if not flags.masked_loss:
            records = _without_mask_files(records)
        return cls(
            datasets,
            records,
            seed=seed,
            prior_loss_weight=flags.prior_loss_weight,
            skipped=[item for s in scans for item in s.skipped],
        )

    def with_changes(self, **changes: Any) -> TrainDataset:
        """A copy with some constructor arguments replaced (e.g. the run's ``plan`` once it is made)."""
        args = dict(
            seed=self.seed,
            prior_loss_weight=self.prior_loss_weight,
            latents=self.latents,
            skipped=self.skipped,
            plan=self.plan,
            subset_names=self.subset_names,
        )
        args.update(changes)
        datasets = args.pop("datasets", self.datasets)
        records = args.pop("records", self.records)
        return type(self)(datasets, records, **args)

    @property
    def max_train_steps(self) -> int | None:
        """The run's step count (token warm-up fractions refer to it); None before the plan is made."""
        return self.plan.max_train_steps if self.plan else None

    def fingerprint(self) -> str:
        """Identifies what the plans are made from (configs, records, seed), for checking a resumed run."""
        records = [[(str(r.path), r.size, r.captions, r.subset_index) for r in recs] for recs in self.records]
        text = repr((self.seed, _set_fields(self.datasets), records))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def batch_plan(self, epoch: int) -> list[BatchPlan]:
        """Every batch of ``epoch`` (from 1) in training order; the same (seed, epoch) always gives the same plan."""
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        start = self.epoch_start_step(epoch)
        batches = self._epoch_batches(epoch)
        per_step = self.plan.batches_per_step if self.plan else 1
        return [
            BatchPlan(epoch, i, d, bucket, items, start + i // per_step) for i, (d, bucket, items) in enumerate(batches)
        ]

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._epoch_lengths:
            self._epoch_lengths[epoch] = len(self._epoch_batches(epoch))
        return self._epoch_lengths[epoch]

    def epoch_start_step(self, epoch: int) -> int:
        """Optimizer steps in the epochs before ``epoch``, counted by the run's plan (``RunPlan.steps_for``)."""
        batches = (self.batches_in_epoch(e) for e in range(1, epoch))
        return sum(self.plan.steps_for(b) if self.plan else b for b in batches)

    def _epoch_batches(self, epoch: int) -> list[tuple[int, tuple[int, int], tuple[int, ...]]]:
        batches: list[tuple[int, tuple[int, int], tuple[int, ...]]] = []
        for d, (dataset, recs) in enumerate(zip(self.datasets, self.records)):
            index_of = {id(r): i for i, r in enumerate(recs)}
            index_by_value = {r: i for i, r in enumerate(recs)}
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for sample in epoch_samples(dataset, recs, epoch, derive_seed(self.seed, "dataset", d)):
                i = index_of.get(id(sample), None)
                i = index_by_value[sample] if i is None else i
                by_bucket.setdefault(self.assignments[d][i].bucket, []).append(i)
            for bucket in sorted(by_bucket):
                items = by_bucket[bucket]
                random.Random(derive_seed(self.seed, "bucket", epoch, d, *bucket)).shuffle(items)
                size = dataset.batch_size
                batches.extend((d, bucket, tuple(items[k : k + size])) for k in range(0, len(items), size))
        random.Random(derive_seed(self.seed, "order", epoch)).shuffle(batches)
        return batches

    def load_batch(self, plan: BatchPlan) -> dict[str, Any] | None:
        """Load one planned batch; images that cannot be read are skipped with one warning (listed in
        ``batch["skipped"]``); None when none of its images could be read.

        SDXL's size conditioning comes as sd-scripts makes it, one (int, int) pair per sample: ``original_sizes_hw``
        (the image before resizing), ``crop_top_lefts`` (``buckets.crop_top_left``) and ``target_sizes_hw`` (the
        bucket); SD 1.x/2.x ignore them."""
        d = plan.dataset_index
        dataset, recs = self.datasets[d], self.records[d]
        cached = self.latents is not None and all((d, i) in self.latents for i in plan.items)
        latents, images, masks, captions, weights, multipliers, paths, flipped, skipped, names = ([] for _ in range(10))
        originals, crops, targets = [], [], []
        for n, i in enumerate(plan.items):
            record = recs[i]
            subset = dataset.subsets[record.subset_index]
            rng = random.Random(derive_seed(self.seed, "augment", plan.epoch, plan.index, n))
            flip = subset.flip_aug and rng.random() < 0.5
            if cached:
                entry = load_entry(self.latents[(d, i)])
                flip = flip and entry.latents_flipped is not None
                latents.append(entry.latents_flipped if flip else entry.latents)
                mask = entry.alpha_mask.unsqueeze(0) if entry.alpha_mask is not None else None
                masks.append(mask.flip(-1) if flip and mask is not None else mask)
                original = entry.original_size
            else:
                assignment = self.assignments[d][i]
                try:
                    prepared = prepare_image(
                        record.path,
                        assignment.bucket,
                        assignment.resized,
                        rng,
                        flip=flip,
                        random_crop=subset.random_crop,
                        color_aug=subset.color_aug,
                        face_crop_aug_range=subset.face_crop_aug_range,
                        alpha_mask=subset.alpha_mask,
                        mask_path=record.mask_path,
                        interpolation=dataset.resize_interpolation,
                        face_crop=not dataset.enable_bucket,
                        conditioning_path=record.conditioning_path,
                        jitter=Jitter.of(subset) if frozen_by_cache(subset) else None,
                    )
                except ImageLoadError as e:
                    if e.path not in self._warned:
                        self._warned.add(e.path)
                        logger.warning("%s; skipping it", e)
                    skipped.append(str(e.path))
                    continue
                images.append(prepared.image)
                masks.append(prepared.mask)
                original = prepared.original_size
            caption_rng = random.Random(derive_seed(self.seed, "caption", plan.epoch, plan.index, n))
            caption = pick_caption(record, subset, caption_rng)
            captions.append(
                process_caption(
                    caption, subset, caption_rng, plan.epoch, plan.global_step, max_train_steps=self.max_train_steps
                )
            )
            weights.append((self.prior_loss_weight if subset.is_reg else 1.0) * subset.loss_weight)
            multipliers.append(dataset.network_multiplier)
            paths.append(str(record.path))
            names.append(self.subset_names[d][record.subset_index])
            flipped.append(flip)
            originals.append((int(original[1]), int(original[0])))
            crops.append(crop_top_left(plan.bucket, original, flip))
            targets.append((plan.bucket[1], plan.bucket[0]))
        if not paths:
            return None
        return {
            "latents": torch.stack(latents) if cached else None,
            "images": None if cached else torch.stack(images),
            "captions": captions,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "alpha_masks": _stack_masks(masks, plan.bucket),
            "network_multipliers": torch.tensor(multipliers, dtype=torch.float32),
            "paths": paths,
            "subsets": names,
            "bucket": plan.bucket,
            "flipped": flipped,
            "original_sizes_hw": originals,
            "crop_top_lefts": crops,
            "target_sizes_hw": targets,
            "skipped": skipped,
            "epoch": plan.epoch,
            "index": plan.index,
            "global_step": plan.global_step,
        }


def _stack_masks(masks: list[torch.Tensor | None], bucket: tuple[int, int]) -> torch.Tensor | None:
    """(B, 1, H, W) or None when no sample has a mask; samples without one get all ones (as sd-scripts)."""
    if all(m is None for m in masks):
        return None
    ones = torch.ones(1, bucket[1], bucket[0])
    return torch.stack([ones if m is None else m for m in masks])


def _set_fields(value: Any) -> Any:
    """``value`` with every dataclass field left at its default omitted, so a setting added in a later version
    (with a default that changes nothing) does not make the states saved before it refuse to resume."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kept = []
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and current == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and current == f.default_factory():
                continue
            kept.append((f.name, _set_fields(current)))
        return (type(value).__name__, tuple(kept))
    if isinstance(value, (list, tuple)):
        return tuple(_set_fields(v) for v in value)
    return value


def cache_job(train: TrainDataset, d: int, i: int, suffix: str = NPZ_SUFFIX) -> CacheJob:
    """Everything record ``i`` of dataset ``d`` has its latents depend on (image, bucket, flip, masks, resize)."""
    dataset, record = train.datasets[d], train.records[d][i]
    subset, a = dataset.subsets[record.subset_index], train.assignments[d][i]
    return CacheJob(
        record.path,
        a.bucket,
        a.resized,
        record.size,
        subset.flip_aug,
        subset.alpha_mask,
        record.mask_path,
        dataset.resize_interpolation,
        record.conditioning_path,
        suffix,
    )


def attach_latent_cache(
    train: TrainDataset,
    vae: torch.nn.Module,
    *,
    to_disk: bool,
    batch_size: int = 1,
    skip_check: bool = False,
    progress: bool = True,
    flag: str = "--cache_latents",
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
    latents_npz_suffix: str = NPZ_SUFFIX,
) -> TrainDataset:
    """Encode (or reuse) the latents of every record; images that cannot be decoded are dropped and listed.

    Under several processes each encodes its share (``latent_cache.cache_latents_shared``: ``barrier`` is needed
    for a disk cache, ``gather`` to share an in-memory one), and every process ends with the same dataset.
    ``latents_npz_suffix`` ends the disk cache's file names (sd-scripts: ``_sd.npz``, SDXL ``_sdxl.npz``)."""
    refuse_incompatible(train.datasets, flag)
    ready = dict(train.latents or {})  # prepared npz files (attach_prepared_latents) are not encoded again
    where = [(d, i) for d, recs in enumerate(train.records) for i in range(len(recs)) if (d, i) not in ready]
    jobs = [cache_job(train, d, i, latents_npz_suffix) for d, i in where]
    report = cache_latents_shared(
        jobs,
        vae,
        to_disk=to_disk,
        process_index=process_index,
        num_processes=num_processes,
        barrier=barrier,
        gather=gather,
        batch_size=batch_size,
        skip_check=skip_check,
        progress=progress,
    )
    logger.info(
        "latents: %d encoded, %d reused from disk, %d failed", report.encoded, report.reused, len(report.failed)
    )
    failed = {e.path for e in report.failed}
    records: list[list[ImageRecord]] = []
    latents: dict[tuple[int, int], LatentEntry | Path] = {}
    position = {w: j for j, w in enumerate(where)}
    for d, recs in enumerate(train.records):
        kept: list[ImageRecord] = []
        for i, record in enumerate(recs):
            if (d, i) not in ready and record.path in failed:
                continue
            latents[(d, len(kept))] = ready[(d, i)] if (d, i) in ready else report.entries[position[(d, i)]]
            kept.append(record)
        records.append(kept)
    skipped = train.skipped + [(e.path, e.reason) for e in report.failed]
    return train.with_changes(records=records, latents=latents, skipped=skipped)


def attach_prepared_latents(train: TrainDataset, vae: torch.nn.Module | None) -> TrainDataset:
    """Use prepare_buckets_latents.py's npz files (``ImageRecord.latents_npz``) as they are, with no VAE call.

    A file that does not fit the run or is stale (``latent_cache.prepared_problem``: image changed, other VAE, no
    flipped latents for flip_aug, ...) is set aside with a warning and its image is encoded instead, never the stale
    latents used; when its image is gone too, the image is skipped. Subsets with color_aug or random_crop train from
    their images (as sd-scripts), and so do those with rotation or colour jitter (``latent_cache.frozen_by_cache``).
    Logs how many latents came from prepared files."""
    candidates = [(d, i) for d, recs in enumerate(train.records) for i, r in enumerate(recs) if r.latents_npz]
    if not candidates:
        return train
    vae_id = vae_fingerprint(vae) if vae is not None else None

    def problem(place: tuple[int, int]) -> str | None:
        d, i = place
        dataset, record = train.datasets[d], train.records[d][i]
        subset = dataset.subsets[record.subset_index]
        if subset.color_aug or subset.random_crop:
            return "color_aug and random_crop need the image itself"
        frozen = frozen_by_cache(subset)
        if frozen:
            return f"{frozen} (rotation/colour jitter) needs the image itself"
        return prepared_problem(record.latents_npz, cache_job(train, d, i), vae_id)  # type: ignore[arg-type]

    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        problems = dict(zip(candidates, pool.map(problem, candidates)))
    set_aside = [(place, reason) for place, reason in problems.items() if reason is not None]
    for (d, i), reason in set_aside[:_SHOWN]:
        logger.warning("%s: prepared latents not used: %s", train.records[d][i].latents_npz, reason)
    if len(set_aside) > _SHOWN:
        logger.warning("... and %d more prepared latents files not used", len(set_aside) - _SHOWN)
    old = dict(train.latents or {})
    records: list[list[ImageRecord]] = []
    latents: dict[tuple[int, int], LatentEntry | Path] = {}
    skipped = list(train.skipped)
    for d, recs in enumerate(train.records):
        kept: list[ImageRecord] = []
        for i, record in enumerate(recs):
            reason = problems.get((d, i))
            if (d, i) in problems and reason is None:
                latents[(d, len(kept))] = record.latents_npz  # type: ignore[assignment]
            elif (d, i) in old:
                latents[(d, len(kept))] = old[(d, i)]
            elif reason is not None and not record.path.exists():
                skipped.append((record.path, f"image not found and its prepared latents are not usable: {reason}"))
                continue
            kept.append(record)
        records.append(kept)
    used = len(candidates) - len(set_aside)
    total = sum(len(r) for r in records)
    logger.info(
        "latents: %d of %d images from prepared npz files (prepare_buckets_latents.py, no VAE needed); %d set aside",
        used,
        total,
        len(set_aside),
    )
    return train.with_changes(records=records, latents=latents or None, skipped=skipped)


def _without_mask_files(records: list[list[ImageRecord]]) -> list[list[ImageRecord]]:
    """Mask files (``<stem>-masklabel.png``, conditioning_data_dir images) weight the loss only with
    ``--masked_loss``; say so if some are there."""
    found = sum(r.mask_path is not None for rs in records for r in rs)
    if found:
        logger.info("%d mask file(s) <stem>-masklabel.png found; pass --masked_loss to weight the loss by them", found)
    if any(r.conditioning_path is not None for rs in records for r in rs):
        logger.warning(
            "conditioning_data_dir is set but --masked_loss is not: its images serve only as loss masks here "
            "(ControlNet training is not part of this toolkit), so they are not used; pass --masked_loss to use them"
        )
    plain = [dataclasses.replace(r, mask_path=None, conditioning_path=None) for rs in records for r in rs]
    out, start = [], 0
    for rs in records:
        out.append(plain[start : start + len(rs)])
        start += len(rs)
    return out


def build_train_dataset(
    flags: DatasetFlags, allowed_styles: set[str], vae: torch.nn.Module | None = None, *, seed: int, **caching: Any
) -> TrainDataset:
    """The training dataset of :func:`build_datasets` (the held-out validation images left out)."""
    return build_datasets(flags, allowed_styles, vae, seed=seed, validation=False, **caching)[0]


def build_datasets(
    flags: DatasetFlags,
    allowed_styles: set[str],
    vae: torch.nn.Module | None = None,
    *,
    seed: int,
    validation: bool = True,
    **caching: Any,
) -> tuple[TrainDataset, TrainDataset | None]:
    """Flags/TOML -> dataset configs -> scanned records -> validation split -> buckets -> (latent cache when asked
    and ``vae`` given), for the training images and (``validation``) the held-out ones (None when none).

    The held-out images (``validation_split``, ``is_val`` subsets: ``library.dataset.validation``) are never in the
    training dataset; the validation dataset is of the same class, seeded by the validation seed, with every random
    augmentation off, and its latents are cached like the training images'. ``seed`` is the run's one seed.
    ``caching``: ``progress``, and ``process_index``/``num_processes``/``barrier``/``gather`` to split latent
    caching across processes, ``latents_npz_suffix`` (see ``attach_latent_cache``). ``--dataset_class`` swaps in a
    TrainDataset subclass.
    """
    cls = load_dataset_class(flags.dataset_class) if flags.dataset_class else TrainDataset
    found = cls.from_settings(flags, allowed_styles, seed=seed)
    if not isinstance(found, TrainDataset):
        raise UserError(f"--dataset_class {flags.dataset_class}: from_settings() must return an instance of the class")
    split = split_records(found.datasets, found.records, found.subset_names)
    part, held = split.train, split.validation if validation else None
    train = found.with_changes(datasets=part.datasets, records=part.records, subset_names=part.names)
    train = _with_latents(train, flags, vae, **caching)
    if held is None:
        return train, None
    logger.info("validation: %d image(s) held out, never trained on", held.images)
    seed = validation_seed_of(held.datasets[0])
    val = found.with_changes(
        datasets=held.datasets, records=held.records, subset_names=held.names, seed=seed, skipped=[], plan=None
    )
    return train, _with_latents(val.with_changes(latents=None), flags, vae, **caching)


def _with_latents(
    train: TrainDataset, flags: DatasetFlags, vae: torch.nn.Module | None, **caching: Any
) -> TrainDataset:
    """Prepared npz latents, then the latent cache when --cache_latents[_to_disk] asks for it (not with
    --debug_dataset)."""
    if flags.debug_dataset:
        return train
    datasets = train.datasets
    train = attach_prepared_latents(train, vae)
    to_disk = flags.cache_latents_to_disk
    if not (to_disk or flags.cache_latents):
        return train
    flag = "--cache_latents_to_disk" if to_disk else "--cache_latents"
    if vae is None:
        refuse_incompatible(datasets, flag)
        return train
    return attach_latent_cache(
        train,
        vae,
        to_disk=to_disk,
        batch_size=flags.vae_batch_size or max(d.batch_size for d in datasets),
        skip_check=flags.skip_cache_check,
        flag=flag,
        **caching,
    )


def load_dataset_class(spec: str) -> type[TrainDataset]:
    """The class named by ``--dataset_class package.module.ClassName`` (sd-scripts' flag), imported from the
    Python path or the current folder.

    It must subclass ``library.dataset.loader.TrainDataset``: the loop calls its ``from_settings`` (build from the
    ``DatasetFlags`` and the run's seed), ``batch_plan(epoch)`` and ``load_batch(plan)``, so a subclass overrides
    those it needs. sd-scripts' ``MinimalDataset`` subclasses build on sd-scripts' own modules and cannot be loaded
    here.
    """
    interface = "a subclass of library.dataset.loader.TrainDataset (see its from_settings/batch_plan/load_batch)"
    module_name, _, class_name = spec.rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"--dataset_class {clip(spec)}: expected package.module.ClassName naming {interface}")
    try:
        module = _import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while it is imported
        hint = " (sd-scripts' own dataset classes cannot run here)" if "train_util" in str(e) else ""
        raise UserError(
            f"--dataset_class {clip(spec)}: cannot import {clip(module_name)} ({clip(f'{type(e).__name__}: {e}')})"
            f"{hint}; it must name {interface}"
        ) from e
    found = getattr(module, class_name, None)
    if found is None:
        raise UserError(f"--dataset_class {clip(spec)}: module {clip(module_name)} has no {clip(class_name)}")
    if not (isinstance(found, type) and issubclass(found, TrainDataset)):
        raise UserError(f"--dataset_class {clip(spec)}: {clip(class_name)} is not {interface}")
    return found


def _import_module(name: str) -> Any:
    """``importlib.import_module``, retried with the current folder on the path (where sd-scripts users keep it)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name) or os.getcwd() in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)
