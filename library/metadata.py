"""Metadata written into trained files: sd-scripts' ``ss_*`` keys and A1111's ``sshs_*`` hashes (``modelspec.*``
is in ``library.modelspec``).

Every value is a string (nested values are JSON), keys and formats as sd-scripts' train_network writes them, so
tools that read those files (A1111's additional-networks, metadata editors, civitai) understand ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from library.modelspec import thumbnail_file

if TYPE_CHECKING:
    from library.models.family import ModelFamily

SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000


def addnet_hash_legacy(data: bytes) -> str:
    """Old additional-networks hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]


def addnet_hash_safetensors(data: bytes) -> str:
    """New additional-networks hash: sha256 of everything after the safetensors header (the tensor bytes)."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of ``tensors`` serialised with only the ``ss_*`` metadata.

    Only training metadata takes part, so editing user metadata (titles, modelspec) later leaves the hashes valid.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), ss_only)
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


def model_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash of a file (``ss_sd_model_hash``); folders give ``IsADirectory`` as in sd-scripts."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


def calculate_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole file (``ss_new_sd_model_hash``); folders give ``IsADirectory`` as in sd-scripts."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def count_tags(captions: Iterable[str], counts: dict[str, int] | None = None) -> dict[str, int]:
    """sd-scripts' tag frequency: each caption split at commas, tags stripped and lower-cased, empty ones dropped.

    ``counts`` is updated in place (subsets sharing a folder name add into one dict) and returned."""
    counts = {} if counts is None else counts
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def bucket_info(samples_per_bucket: Mapping[tuple[int, int], int], aspect_errors: Sequence[float]) -> dict[str, Any]:
    """sd-scripts' ``bucket_info``: buckets numbered in resolution order with their sample counts (repeats
    included), and the mean absolute aspect-ratio error (bucket w/h minus image w/h) over the images."""
    used = sorted(reso for reso, count in samples_per_bucket.items() if count > 0)
    buckets = {i: {"resolution": list(reso), "count": samples_per_bucket[reso]} for i, reso in enumerate(used)}
    mean_error = sum(abs(e) for e in aspect_errors) / len(aspect_errors) if aspect_errors else 0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}


@dataclass
class SubsetMetadata:
    """One subset of a dataset as it appears in ``ss_datasets``."""

    img_count: int
    num_repeats: float = 1
    image_dir: str | None = None
    metadata_file: str | None = None
    class_tokens: str | None = None
    is_reg: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    resize_interpolation: str | None = None


@dataclass
class DatasetMetadata:
    """One dataset (batch size, resolution, buckets, tag counts per folder) as it appears in ``ss_datasets``."""

    is_dreambooth: bool
    batch_size: int
    num_train_images: int
    num_reg_images: int
    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_no_upscale: bool = False
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict | None = None
    resize_interpolation: str | None = None
    subsets: list[SubsetMetadata] = field(default_factory=list)


@dataclass(frozen=True)
class MetadataSettings:
    """The flags recorded in ``ss_*`` and ``modelspec.*`` (flag names; build with ``settings_from_flags``); the
    model's family and prediction type come from the loaded model, not from ``--v2``/``--v_parameterization``."""

    output_name: str | None = None
    pretrained_model_name_or_path: str | None = None
    vae: str | None = None
    dataset_config: str | None = None
    optimizer_args: list[str] | None = None
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    lr_warmup_steps: Any = 0
    lr_scheduler: str = "constant"
    mixed_precision: str = "no"
    full_fp16: bool = False
    clip_skip: int | None = None
    max_token_length: int | None = None
    cache_latents: bool = False
    lowram: bool = False
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    adaptive_noise_scale: float | None = None
    zero_terminal_snr: bool = False
    training_comment: str | None = None
    max_grad_norm: float = 1.0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    face_crop_aug_range: Any = None
    prior_loss_weight: float = 1.0
    min_snr_gamma: float | None = None
    ip_noise_gamma: float | None = None
    debiased_estimation_loss: bool = False
    noise_offset_random_strength: bool = False
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    huber_c: float = 0.1
    fp8_base: bool = False
    fp8_base_unet: bool = False
    validation_seed: int | None = None
    validation_split: float = 0.0
    max_validation_steps: int | None = None
    validate_every_n_epochs: int | None = None
    validate_every_n_steps: int | None = None
    resize_interpolation: str | None = None
    train_batch_size: int = 1
    resolution: Any = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    min_timestep: int | None = None
    max_timestep: int | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_usage_hint: str | None = None
    metadata_thumbnail: str | None = None
    metadata_merged_from: str | None = None
    metadata_preprocessor: str | None = None
    metadata_is_negative_embedding: str | None = None
    learning_rate: float = 2e-06
    text_encoder_lr: Any = None
    unet_lr: float | None = None
    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float = 1
    network_dropout: float | None = None
    scale_weight_norms: float | None = None


@dataclass
class TrainingFacts:
    """What ``ss_*`` records about a run: the recorded ``flags``, and what the run computed (counts, optimizer,
    seed; ``v2`` and ``base_model_version`` are the model family's). Build it with ``from_settings``."""

    session_id: int = 0
    training_started_at: float = 0.0
    num_train_images: int = 0
    num_validation_images: int = 0
    num_reg_images: int = 0
    num_batches_per_epoch: int = 0
    num_epochs: int = 0
    max_train_steps: int | None = None
    network_args: dict[str, str] | None = None
    v2: bool = False
    base_model_version: str = ""
    seed: int | None = None
    commit_hash: str | None = None
    optimizer_name: str = ""
    optimizer_args: str = ""
    num_processes: int = 1
    flags: MetadataSettings = field(default_factory=MetadataSettings)

    @classmethod
    def from_settings(
        cls, settings: MetadataSettings, family: ModelFamily, v_parameterization: bool, **computed: Any
    ) -> TrainingFacts:
        """The recorded flags (``settings``), the model ``family``'s ``ss_v2`` and ``ss_base_model_version``, and
        what the run computed (counts, optimizer, ids)."""
        return cls(
            flags=settings,
            optimizer_args=",".join(settings.optimizer_args or []),
            v2=family.v2,
            base_model_version=family.base_model_version(v_parameterization),
            **computed,
        )


def build_training_metadata(
    facts: TrainingFacts, datasets: list[DatasetMetadata] | None = None, use_user_config: bool = True
) -> dict[str, str]:
    """The ``ss_*`` dict train_network writes before the first save (without the per-save step/epoch keys)."""
    f, s = facts, facts.flags
    optimizer = f.optimizer_name + (f"({f.optimizer_args})" if f.optimizer_args else "")
    md: dict[str, Any] = {
        "ss_session_id": f.session_id,
        "ss_training_started_at": f.training_started_at,
        "ss_output_name": s.output_name,
        "ss_learning_rate": s.learning_rate,
        "ss_text_encoder_lr": s.text_encoder_lr,
        "ss_unet_lr": s.unet_lr,
        "ss_num_train_images": f.num_train_images,
        "ss_num_validation_images": f.num_validation_images,
        "ss_num_reg_images": f.num_reg_images,
        "ss_num_batches_per_epoch": f.num_batches_per_epoch,
        "ss_num_epochs": f.num_epochs,
        "ss_gradient_checkpointing": s.gradient_checkpointing,
        "ss_gradient_accumulation_steps": s.gradient_accumulation_steps,
        "ss_max_train_steps": f.max_train_steps,
        "ss_lr_warmup_steps": s.lr_warmup_steps,
        "ss_lr_scheduler": s.lr_scheduler,
        "ss_network_module": s.network_module,
        "ss_network_dim": s.network_dim,
        "ss_network_alpha": s.network_alpha,
        "ss_network_dropout": s.network_dropout,
        "ss_mixed_precision": s.mixed_precision,
        "ss_full_fp16": bool(s.full_fp16),
        "ss_v2": bool(f.v2),
        "ss_base_model_version": f.base_model_version,
        "ss_clip_skip": s.clip_skip,
        "ss_max_token_length": s.max_token_length,
        "ss_cache_latents": bool(s.cache_latents),
        "ss_seed": f.seed,
        "ss_lowram": s.lowram,
        "ss_noise_offset": s.noise_offset,
        "ss_multires_noise_iterations": s.multires_noise_iterations,
        "ss_multires_noise_discount": s.multires_noise_discount,
        "ss_adaptive_noise_scale": s.adaptive_noise_scale,
        "ss_zero_terminal_snr": s.zero_terminal_snr,
        "ss_training_comment": s.training_comment,
        "ss_sd_scripts_commit_hash": f.commit_hash,
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": s.max_grad_norm,
        "ss_caption_dropout_rate": s.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": s.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": s.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": s.face_crop_aug_range,
        "ss_prior_loss_weight": s.prior_loss_weight,
        "ss_min_snr_gamma": s.min_snr_gamma,
        "ss_scale_weight_norms": s.scale_weight_norms,
        "ss_ip_noise_gamma": s.ip_noise_gamma,
        "ss_debiased_estimation": bool(s.debiased_estimation_loss),
        "ss_noise_offset_random_strength": s.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": s.ip_noise_gamma_random_strength,
        "ss_loss_type": s.loss_type,
        "ss_huber_schedule": s.huber_schedule,
        "ss_huber_scale": s.huber_scale,
        "ss_huber_c": s.huber_c,
        "ss_fp8_base": bool(s.fp8_base),
        "ss_fp8_base_unet": bool(s.fp8_base_unet),
        "ss_validation_seed": s.validation_seed,
        "ss_validation_split": s.validation_split,
        "ss_max_validation_steps": s.max_validation_steps,
        "ss_validate_every_n_epochs": s.validate_every_n_epochs,
        "ss_validate_every_n_steps": s.validate_every_n_steps,
        "ss_resize_interpolation": s.resize_interpolation,
    }
    if datasets:
        md.update(_datasets_metadata(f, datasets) if use_user_config else _legacy_dataset_metadata(f, datasets[0]))
    if f.network_args:
        md["ss_network_args"] = json.dumps(f.network_args)
    if s.pretrained_model_name_or_path is not None:
        name = s.pretrained_model_name_or_path
        if os.path.exists(name):
            md["ss_sd_model_hash"] = model_hash(name)
            md["ss_new_sd_model_hash"] = calculate_sha256(name)
            name = os.path.basename(os.path.normpath(name))
        md["ss_sd_model_name"] = name
    if s.vae is not None:
        name = s.vae
        if os.path.exists(name):
            md["ss_vae_hash"] = model_hash(name)
            md["ss_new_vae_hash"] = calculate_sha256(name)
            name = os.path.basename(os.path.normpath(name))
        md["ss_vae_name"] = name
    return {k: str(v) for k, v in md.items()}


def _subset_dict(subset: SubsetMetadata, is_dreambooth: bool) -> dict[str, Any]:
    d = asdict(subset)
    out = {k: d[k] for k in ("img_count", "num_repeats")}
    out.update({k: bool(d[k]) for k in ("color_aug", "flip_aug", "random_crop", "shuffle_caption")})
    out.update({k: d[k] for k in ("keep_tokens", "keep_tokens_separator", "secondary_separator")})
    out["enable_wildcard"] = bool(subset.enable_wildcard)
    out.update({k: d[k] for k in ("caption_prefix", "caption_suffix", "resize_interpolation")})
    if subset.image_dir:
        out["image_dir"] = os.path.basename(os.path.normpath(subset.image_dir))
    if is_dreambooth:
        out["class_tokens"] = subset.class_tokens
        out["is_reg"] = subset.is_reg
    else:
        out["metadata_file"] = os.path.basename(subset.metadata_file or "")
    return out


def _subset_dir_name(subset: SubsetMetadata, is_dreambooth: bool) -> str | None:
    """The folder (or metadata file) a subset is listed under in ``ss_dataset_dirs``; reg subsets are not."""
    if is_dreambooth:
        return None if subset.is_reg or not subset.image_dir else os.path.basename(os.path.normpath(subset.image_dir))
    return os.path.basename(subset.metadata_file or "")


def _datasets_metadata(f: TrainingFacts, datasets: list[DatasetMetadata]) -> dict[str, str]:
    entries, tag_frequency, dirs = [], {}, {}
    for ds in datasets:
        entry = {
            "is_dreambooth": ds.is_dreambooth,
            "batch_size_per_device": ds.batch_size,
            "num_train_images": ds.num_train_images,
            "num_reg_images": ds.num_reg_images,
            "resolution": list(ds.resolution),
            "enable_bucket": bool(ds.enable_bucket),
            "min_bucket_reso": ds.min_bucket_reso,
            "max_bucket_reso": ds.max_bucket_reso,
            "tag_frequency": ds.tag_frequency,
            "bucket_info": ds.bucket_info,
            "resize_interpolation": ds.resize_interpolation,
            "subsets": [_subset_dict(s, ds.is_dreambooth) for s in ds.subsets],
        }
        entries.append(entry)
        for subset in ds.subsets:
            name = _subset_dir_name(subset, ds.is_dreambooth)
            if name is None:
                continue
            unique, i = name, 2
            while unique in dirs:
                unique, i = f"{name} ({i})", i + 1
            dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
        for dir_name, freq in ds.tag_frequency.items():
            tag_frequency.setdefault(dir_name, freq)
    return {
        "ss_datasets": json.dumps(entries),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _legacy_dataset_metadata(f: TrainingFacts, ds: DatasetMetadata) -> dict[str, Any]:
    """Flat keys sd-scripts writes when the dataset came from ``--train_data_dir`` rather than a TOML config."""
    s = f.flags
    dirs, reg_dirs = {}, {}
    for subset in ds.subsets:
        info = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
        if ds.is_dreambooth:
            (reg_dirs if subset.is_reg else dirs)[os.path.basename(os.path.normpath(subset.image_dir or ""))] = info
        else:
            dirs[os.path.basename(subset.metadata_file or "")] = info
    return {
        "ss_batch_size_per_device": s.train_batch_size,
        "ss_total_batch_size": s.train_batch_size * f.num_processes * s.gradient_accumulation_steps,
        "ss_resolution": s.resolution,
        "ss_color_aug": bool(s.color_aug),
        "ss_flip_aug": bool(s.flip_aug),
        "ss_random_crop": bool(s.random_crop),
        "ss_shuffle_caption": bool(s.shuffle_caption),
        "ss_enable_bucket": bool(ds.enable_bucket),
        "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
        "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso,
        "ss_keep_tokens": s.keep_tokens,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(ds.tag_frequency),
        "ss_bucket_info": json.dumps(ds.bucket_info),
    }


def minimum_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The keys kept under ``--no_metadata`` (enough for tools to know what kind of network it is)."""
    return {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}


def metadata_for_save(
    metadata: Mapping[str, str], steps: int, epoch: int, no_metadata: bool, modelspec: Mapping[str, str]
) -> dict[str, str]:
    """What one save writes: the run's ``ss_*`` plus finish time, step and epoch (or only the minimum keys under
    ``--no_metadata``), then ``modelspec.*``. The ``sshs_*`` hashes are added by the writer."""
    if no_metadata:
        out = minimum_metadata(metadata)
    else:
        out = dict(metadata)
        out.update(ss_training_finished_at=str(time.time()), ss_steps=str(steps), ss_epoch=str(epoch))
    out.update(modelspec)
    return out


def add_metadata_arguments(parser: argparse.ArgumentParser, network: bool = True) -> None:
    """Flags for metadata (sd-scripts' names); ``network`` adds train_network's ``--no_metadata`` and comment."""
    if network:
        parser.add_argument("--no_metadata", action="store_true", help="do not save ss_* metadata in the output")
        parser.add_argument("--training_comment", type=str, default=None, help="comment stored as ss_training_comment")
    parser.add_argument("--metadata_title", type=str, default=None, help="modelspec.title (default: output name)")
    parser.add_argument("--metadata_author", type=str, default=None, help="modelspec.author")
    parser.add_argument("--metadata_description", type=str, default=None, help="modelspec.description")
    parser.add_argument("--metadata_license", type=str, default=None, help="modelspec.license")
    parser.add_argument("--metadata_tags", type=str, default=None, help="modelspec.tags, comma-separated")
    parser.add_argument("--metadata_trigger_phrase", type=str, default=None, help="modelspec.trigger_phrase")
    parser.add_argument("--metadata_usage_hint", type=str, default=None, help="modelspec.usage_hint")
    parser.add_argument(
        "--metadata_thumbnail",
        type=thumbnail_file,
        default=None,
        help="modelspec.thumbnail: an image file (stored as a data: URL) or a data: URL",
    )
    parser.add_argument(
        "--metadata_merged_from", type=str, default=None, help="modelspec.merged_from: the models merged into this one"
    )
    parser.add_argument("--metadata_preprocessor", type=str, default=None, help="modelspec.preprocessor")
    parser.add_argument(
        "--metadata_is_negative_embedding",
        type=str,
        default=None,
        help="modelspec.is_negative_embedding (e.g. true for a negative textual inversion embedding)",
    )
