"""What a training dataset holds, as one plain value: the start-of-run text, the ``ss_datasets`` metadata entries and
the images that were skipped, so recipes and the loop need not reach into ``TrainDataset``'s internals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from library.dataset.epoch import describe_balancing, samples_per_epoch
from library.dataset.types import DatasetConfig, ImageRecord
from library.metadata import DatasetMetadata, SubsetMetadata, bucket_info, count_tags

if TYPE_CHECKING:
    from library.dataset.loader import BatchPlan, TrainDataset


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset as recipes and the loop see it. ``num_train_images``/``num_reg_images`` count images times
    repeats over all datasets (sd-scripts' ``ss_num_train_images``); ``skipped`` holds unreadable images' paths;
    ``num_validation_images`` counts the held-out images (``ss_num_validation_images``)."""

    lines: tuple[str, ...]
    datasets: tuple[DatasetMetadata, ...]
    num_train_images: int
    num_reg_images: int
    skipped: tuple[str, ...]
    num_validation_images: int = 0

    @property
    def text(self) -> str:
        """The start-of-run text: images per subset with repeats, the bucket table and batches per epoch."""
        return "\n".join(self.lines)

    @property
    def skipped_text(self) -> str:
        """The end-of-run lines listing the skipped images (empty when none were)."""
        if not self.skipped:
            return ""
        names = "\n".join(f"  {name}" for name in self.skipped)
        return f"{len(self.skipped)} image(s) were skipped because they could not be read:\n{names}"

    def with_lines(self, *extra: str) -> DatasetSummary:
        """A copy with ``extra`` lines added to the start-of-run text (e.g. by a dataset wrapper)."""
        return dataclasses.replace(self, lines=(*self.lines, *extra))


def summarize_dataset(train: TrainDataset) -> DatasetSummary:
    """The summary of ``train`` with the batch plan of epoch 1 (the one sd-scripts' bucket counts describe)."""
    plan = train.batch_plan(1)
    datasets = tuple(_dataset_metadata(train, d, plan) for d in range(len(train.datasets)))
    return DatasetSummary(
        lines=tuple(_summary_lines(train, plan)),
        datasets=datasets,
        num_train_images=sum(d.num_train_images for d in datasets),
        num_reg_images=sum(d.num_reg_images for d in datasets),
        skipped=tuple(sorted({str(path) for path, _ in train.skipped})),
    )


def _summary_lines(train: TrainDataset, plan: Sequence[BatchPlan]) -> list[str]:
    """Start-of-run lines: images per subset with repeats, the bucket table and batches in epoch 1 (``plan``)."""
    total = sum(len(r) for r in train.records)
    reg = sum(1 for ds, recs in zip(train.datasets, train.records) for r in recs if ds.subsets[r.subset_index].is_reg)
    lines = [f"images: {total - reg} train, {reg} regularization, in {len(train.datasets)} dataset(s)"]
    for d, (dataset, recs) in enumerate(zip(train.datasets, train.records)):
        width, height = dataset.resolution
        lines.append(
            f"{dataset.name}: batch size {dataset.batch_size}, resolution {width}x{height}, "
            f"buckets {'on' if dataset.enable_bucket else 'off'}"
            + (" (no upscale)" if dataset.enable_bucket and dataset.bucket_no_upscale else "")
        )
        for s, subset in enumerate(dataset.subsets):
            count = sum(1 for r in recs if r.subset_index == s)
            kind = "reg" if subset.is_reg else "train"
            if subset.samples_per_epoch is not None:
                lines.append(f"  {subset.name}: {describe_balancing(subset, count)} ({kind})")
            else:
                lines.append(f"  {subset.name}: {count} images x {subset.num_repeats:g} repeats ({kind})")
        images: dict[tuple[int, int], int] = {}
        for a in train.assignments[d]:
            images[a.bucket] = images.get(a.bucket, 0) + 1
        samples = _samples_per_bucket(plan, d)
        lines.append("  bucket      images  samples/epoch")
        for bucket in sorted(images):
            lines.append(f"  {bucket[0]:>4}x{bucket[1]:<4}  {images[bucket]:>7}  {samples.get(bucket, 0):>13}")
    prepared = sum(
        1
        for (d, i), entry in (train.latents or {}).items()
        if train.records[d][i].latents_npz is not None and entry == train.records[d][i].latents_npz
    )
    if prepared:
        lines.append(f"latents from prepared npz files (prepare_buckets_latents.py): {prepared} of {total}")
    lines.append(f"batches per epoch: {len(plan)} (epoch 1)")
    if train.skipped:
        lines.append(f"skipped images: {len(train.skipped)}")
    return lines


def _samples_per_bucket(plan: Sequence[BatchPlan], d: int) -> dict[tuple[int, int], int]:
    samples: dict[tuple[int, int], int] = {}
    for p in plan:
        if p.dataset_index == d:
            samples[p.bucket] = samples.get(p.bucket, 0) + len(p.items)
    return samples


def _tag_frequency(config: DatasetConfig, records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """``{folder or metadata file name: {tag: count}}`` from the raw captions, as sd-scripts counts them.

    DreamBooth subsets count each image's caption file (or the class tokens when it has none); fine-tuning
    subsets count the ``tags`` of every metadata entry. Subsets with the same folder name share one dict."""
    from library.dataset.scan import read_metadata

    out: dict[str, dict[str, int]] = {}
    for s, subset in enumerate(config.subsets):
        if config.style == "dreambooth":
            name = Path(subset.image_dir or "").name
            captions = [
                "\n".join(r.captions) if r.captions else subset.class_tokens or ""
                for r in records
                if r.subset_index == s
            ]
        else:
            metadata_file = Path(subset.metadata_file or "")
            name = metadata_file.name
            entries = read_metadata(metadata_file).values()
            captions = [str(e["tags"]) for e in entries if e.get("tags") is not None]
        out[name] = count_tags(captions, out.get(name))
    return out


def _bucket_info(train: TrainDataset, d: int, plan: Sequence[BatchPlan]) -> dict | None:
    """``bucket_info`` of dataset ``d`` (None without bucketing): samples per bucket in the plan, repeats included."""
    if not train.datasets[d].enable_bucket:
        return None
    errors = [a.bucket[0] / a.bucket[1] - r.size[0] / r.size[1] for r, a in zip(train.records[d], train.assignments[d])]
    return bucket_info(_samples_per_bucket(plan, d), errors)


def _dataset_metadata(train: TrainDataset, d: int, plan: Sequence[BatchPlan]) -> DatasetMetadata:
    """The ``ss_datasets`` entry of dataset ``d``."""
    config, records = train.datasets[d], train.records[d]
    subsets = []
    for s, subset in enumerate(config.subsets):
        subsets.append(
            SubsetMetadata(
                img_count=sum(1 for r in records if r.subset_index == s),
                num_repeats=subset.num_repeats,
                image_dir=None if subset.image_dir is None else Path(subset.image_dir).name,
                metadata_file=None if subset.metadata_file is None else Path(subset.metadata_file).name,
                class_tokens=subset.class_tokens,
                is_reg=subset.is_reg,
                color_aug=subset.color_aug,
                flip_aug=subset.flip_aug,
                random_crop=subset.random_crop,
                shuffle_caption=subset.shuffle_caption,
                keep_tokens=subset.keep_tokens,
                keep_tokens_separator=subset.keep_tokens_separator,
                secondary_separator=subset.secondary_separator,
                enable_wildcard=subset.enable_wildcard,
                caption_prefix=subset.caption_prefix,
                caption_suffix=subset.caption_suffix,
            )
        )
    per_epoch = [samples_per_epoch(subset, s.img_count) for subset, s in zip(config.subsets, subsets)]
    reg = sum(n for s, n in zip(subsets, per_epoch) if s.is_reg)
    train_images = sum(n for s, n in zip(subsets, per_epoch) if not s.is_reg)
    return DatasetMetadata(
        is_dreambooth=config.style == "dreambooth",
        batch_size=config.batch_size,
        num_train_images=int(train_images),
        num_reg_images=int(reg),
        resolution=config.resolution,
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_no_upscale=config.bucket_no_upscale,
        tag_frequency=_tag_frequency(config, records),
        bucket_info=_bucket_info(train, d, plan),
        resize_interpolation=config.resize_interpolation,
        subsets=subsets,
    )
