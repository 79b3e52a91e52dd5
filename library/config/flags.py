"""sd-scripts' command-line flags, grouped by concern. Names and defaults match sd-scripts so habits carry over."""

from __future__ import annotations

import argparse

from library.config.dataset_schema import AUGMENT_RANGES
from library.config.values import DATASET_RANGES, NON_NEGATIVE_INT, POSITIVE_INT, SEED

_AUGMENT_HELP = {
    "rotate_aug_max_angle": "rotate each sample by a random angle in [-A, A] degrees (masks follow); default for "
    "every subset's rotate_aug_max_angle",
    "rotate_aug_fixed_angle": "rotate every sample by A degrees, counter-clockwise (masks follow)",
    "brightness_aug": "random brightness factor in [1-S, 1+S] per sample",
    "brightness_aug_fixed": "brightness factor 1+S for every sample",
    "contrast_aug": "random contrast factor in [1-S, 1+S] per sample",
    "contrast_aug_fixed": "contrast factor 1+S for every sample",
    "saturation_aug": "random saturation factor in [1-S, 1+S] per sample",
    "saturation_aug_fixed": "saturation factor 1+S for every sample",
    "hue_aug": "random hue shift in [-S/2, S/2] of the colour wheel per sample",
    "hue_aug_fixed": "hue shift S/2 of the colour wheel for every sample",
}


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Console logging flags (sd-scripts' add_logging_arguments, plus ``--debug``); applied by library.cli."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument(
        "--console_log_level",
        type=str.upper,
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="lowest level of log messages shown (default INFO)",
    )
    parser.add_argument(
        "--console_log_file", type=str, default=None, help="also write the log to this file (overwritten each run)"
    )
    parser.add_argument(
        "--console_log_simple",
        action="store_true",
        help="plain log lines without rich formatting (sd-trainer's log lines are always plain)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which base model to load and how (sd-scripts' add_sd_models_arguments)."""
    parser.add_argument(
        "--v2", action="store_true", default=None, help="the base model is Stable Diffusion 2.x (detected if omitted)"
    )
    parser.add_argument(
        "--v_parameterization",
        action="store_true",
        default=None,
        help="the base model predicts v (SD 2.x 768-v models; detected where the file says so)",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="diffusers folder, Hugging Face repo id, or single .safetensors/.ckpt file",
    )
    parser.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder to cache the tokenizer in")
    parser.add_argument("--vae", type=str, default=None, help="replacement VAE: file, diffusers folder or repo id")
    parser.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="allow .ckpt files that run code while loading (only for files from a source you trust)",
    )


def add_text_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """How captions become text-encoder outputs: CLIP skip, long prompts, (tag:1.2) weights."""
    parser.add_argument(
        "--clip_skip", type=POSITIVE_INT.argtype(), default=None, help="use the output of the N-th layer from the end"
    )
    parser.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225])
    parser.add_argument("--weighted_captions", action="store_true", help="A1111-style (tag:1.2) weights in captions")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Dataset flags (sd-scripts' add_dataset_arguments and config_util.add_config_arguments)."""
    parser.add_argument("--dataset_config", type=str, default=None, help="dataset config (.toml or .json)")
    parser.add_argument("--train_data_dir", type=str, default=None)
    parser.add_argument("--reg_data_dir", type=str, default=None)
    parser.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata file")
    parser.add_argument(
        "--conditioning_data_dir", type=str, default=None, help="folder of conditioning images (ControlNet-style data)"
    )
    parser.add_argument("--dataset_class", type=str, default=None, help="custom dataset class as package.module.Class")
    parser.add_argument(
        "--cache_info", action="store_true", help="cache captions and image sizes for faster DreamBooth dataset loading"
    )
    parser.add_argument("--dataset_repeats", type=DATASET_RANGES["dataset_repeats"].argtype(), default=1)
    parser.add_argument("--train_batch_size", type=DATASET_RANGES["batch_size"].argtype(), default=1)
    parser.add_argument("--shuffle_caption", action="store_true")
    parser.add_argument("--caption_separator", type=str, default=",")
    parser.add_argument("--caption_extension", type=str, default=".caption")
    parser.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep_tokens", type=DATASET_RANGES["keep_tokens"].argtype(), default=0)
    parser.add_argument("--keep_tokens_separator", type=str, default="")
    parser.add_argument("--secondary_separator", type=str, default=None)
    parser.add_argument("--enable_wildcard", action="store_true")
    parser.add_argument("--caption_prefix", type=str, default=None)
    parser.add_argument("--caption_suffix", type=str, default=None)
    parser.add_argument("--color_aug", action="store_true")
    parser.add_argument("--flip_aug", action="store_true")
    parser.add_argument("--face_crop_aug_range", type=str, default=None, help="e.g. 2.0,4.0")
    parser.add_argument("--random_crop", action="store_true")
    parser.add_argument("--debug_dataset", action="store_true")
    parser.add_argument("--debug_dataset_dir", type=str, default=None, help="write processed images here")
    parser.add_argument("--resolution", type=str, default=None, help="'512' or '512,768'")
    parser.add_argument("--cache_latents", action="store_true")
    parser.add_argument(
        "--vae_batch_size",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="images per VAE call when caching (default: the batch size)",
    )
    parser.add_argument("--cache_latents_to_disk", action="store_true")
    parser.add_argument("--skip_cache_check", action="store_true")
    parser.add_argument("--enable_bucket", action="store_true")
    parser.add_argument("--min_bucket_reso", type=DATASET_RANGES["min_bucket_reso"].argtype(), default=256)
    parser.add_argument("--max_bucket_reso", type=DATASET_RANGES["max_bucket_reso"].argtype(), default=1024)
    parser.add_argument("--bucket_reso_steps", type=DATASET_RANGES["bucket_reso_steps"].argtype(), default=64)
    parser.add_argument("--bucket_no_upscale", action="store_true")
    parser.add_argument("--token_warmup_min", type=DATASET_RANGES["token_warmup_min"].argtype(), default=1)
    parser.add_argument("--token_warmup_step", type=DATASET_RANGES["token_warmup_step"].argtype(), default=0)
    parser.add_argument("--alpha_mask", action="store_true")
    parser.add_argument("--caption_dropout_rate", type=DATASET_RANGES["caption_dropout_rate"].argtype(), default=0.0)
    parser.add_argument(
        "--caption_dropout_every_n_epochs", type=DATASET_RANGES["caption_dropout_every_n_epochs"].argtype(), default=0
    )
    parser.add_argument(
        "--caption_tag_dropout_rate", type=DATASET_RANGES["caption_tag_dropout_rate"].argtype(), default=0.0
    )
    parser.add_argument("--prior_loss_weight", type=DATASET_RANGES["prior_loss_weight"].argtype(), default=1.0)
    parser.add_argument("--max_data_loader_n_workers", type=NON_NEGATIVE_INT.argtype(), default=None)
    parser.add_argument("--persistent_data_loader_workers", action="store_true")
    parser.add_argument("--resize_interpolation", type=str, default=None)
    parser.add_argument("--validation_seed", type=DATASET_RANGES["validation_seed"].argtype(), default=None)
    parser.add_argument("--validation_split", type=DATASET_RANGES["validation_split"].argtype(), default=0.0)
    parser.add_argument("--seed", type=SEED.argtype(), default=None, help="random seed, 0 to 4294967295")
    for key, rule in AUGMENT_RANGES.items():
        parser.add_argument(f"--{key}", type=rule.argtype(), default=0.0, help=_AUGMENT_HELP[key] + " (0 = off)")
