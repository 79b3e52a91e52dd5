"""Plain values passed between the dataset stages: resolved configs and scanned image records.

config (TOML / flags) -> DatasetConfig[SubsetConfig] -> scan -> ImageRecord -> epoch plan -> buckets/batches -> loader
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DatasetStyle = Literal["dreambooth", "finetune"]


# SubsetConfig's rotation and colour-jitter keys: each changes the pixels of every sample when non-zero.
PIXEL_AUGMENT_KEYS = (
    "rotate_aug_max_angle",
    "rotate_aug_fixed_angle",
    "brightness_aug",
    "brightness_aug_fixed",
    "contrast_aug",
    "contrast_aug_fixed",
    "saturation_aug",
    "saturation_aug_fixed",
    "hue_aug",
    "hue_aug_fixed",
)


@dataclass(frozen=True)
class SubsetConfig:
    """One folder (DreamBooth style) or metadata file (fine-tuning style) with every setting resolved."""

    name: str  # where it came from, for messages: "datasets[0].subsets[1]" or "--train_data_dir 10_sls frog"
    image_dir: Path | None = None
    metadata_file: Path | None = None
    recursive: bool = False  # also scan image_dir's sub-folders (OneTrainer's "include subdirectories")
    is_reg: bool = False
    is_val: bool = False  # validation-only: every image is held out for the validation loss, none trained on
    num_repeats: float = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    alpha_mask: bool = False
    conditioning_data_dir: Path | None = None  # loss-mask images matched by file stem (used with --masked_loss)
    cache_info: bool = False
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    # OneTrainer's image augmentations (0 = off): a random draw in [-x, x] per sample, or a fixed amount every time
    rotate_aug_max_angle: float = 0.0  # degrees, counter-clockwise
    rotate_aug_fixed_angle: float = 0.0
    brightness_aug: float = 0.0  # factor 1 +- x
    brightness_aug_fixed: float = 0.0  # factor 1 + x
    contrast_aug: float = 0.0
    contrast_aug_fixed: float = 0.0
    saturation_aug: float = 0.0
    saturation_aug_fixed: float = 0.0
    hue_aug: float = 0.0  # hue shift +- x/2 of the colour wheel
    hue_aug_fixed: float = 0.0  # hue shift x/2
    loss_weight: float = 1.0  # multiplies each sample's loss (reg subsets: prior_loss_weight x loss_weight)
    samples_per_epoch: int | None = None  # balancing_strategy "samples": exactly this many samples per epoch


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: a batch size, a resolution and bucket settings shared by its subsets."""

    name: str  # "datasets[0]"
    style: DatasetStyle
    subsets: tuple[SubsetConfig, ...]
    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)  # (width, height); an area budget when bucketing
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One training image found on disk, with its size read from the file header (not decoded)."""

    path: Path
    size: tuple[int, int]  # (width, height)
    captions: tuple[str, ...]  # raw caption candidates (several only with enable_wildcard); () when none found
    subset_index: int  # index into DatasetConfig.subsets
    mask_path: Path | None = None  # "<stem>-masklabel.png" beside the image, when present
    conditioning_path: Path | None = None  # "<conditioning_data_dir>/<stem>.<ext>": a mask from its red channel
    bucket: tuple[int, int] | None = None  # (width, height) fixed by the metadata's "train_resolution"
    latents_npz: Path | None = None  # prepare_buckets_latents.py's "<image_key>.npz", when the metadata has one
