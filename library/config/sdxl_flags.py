"""The flags sd-scripts' SDXL scripts add to their SD 1.x/2.x counterparts (``sdxl_train_util`` and
``sdxl_train.py``), under the same names and defaults."""

from __future__ import annotations

import argparse
import logging

from library.config.values import NON_NEGATIVE
from library.errors import UserError

logger = logging.getLogger("sdtrain")

SD_FAMILIES = ("sd1", "sd2")  # the model families the scripts without the sdxl_ prefix train
SDXL_FAMILIES = ("sdxl",)  # and those the sdxl_* scripts train
UNET_BLOCKS_FOR_BLOCK_LR = 23  # sd-scripts: time/label embedding, 9 input, 3 middle, 9 output blocks, out


def add_sdxl_arguments(parser: argparse.ArgumentParser, *, text_encoder_caching: bool = True) -> None:
    """``--cache_text_encoder_outputs[_to_disk]`` (not in textual inversion, which trains through the encoders) and
    ``--disable_mmap_load_safetensors``."""
    if text_encoder_caching:
        parser.add_argument(
            "--cache_text_encoder_outputs",
            action="store_true",
            help="encode every caption once before training (the text encoders then leave the GPU)",
        )
        parser.add_argument(
            "--cache_text_encoder_outputs_to_disk",
            action="store_true",
            help="also keep them in <image>_te_outputs.npz files beside the images (implies the flag above)",
        )
    parser.add_argument(
        "--disable_mmap_load_safetensors",
        action="store_true",
        help="read a single-file model into memory instead of memory-mapping it (faster on WSL)",
    )


def add_sdxl_full_arguments(parser: argparse.ArgumentParser) -> None:
    """sdxl_train.py's own flags: per-encoder learning rates, --train_text_encoder and --block_lr."""
    parser.add_argument(
        "--learning_rate_te1", type=NON_NEGATIVE.argtype(), default=None, help="text encoder 1 (CLIP-L) LR"
    )
    parser.add_argument(
        "--learning_rate_te2", type=NON_NEGATIVE.argtype(), default=None, help="text encoder 2 (OpenCLIP-G) LR"
    )
    parser.add_argument("--train_text_encoder", action="store_true", help="train both text encoders too")
    parser.add_argument(
        "--block_lr",
        type=str,
        default=None,
        help=f"learning rates of the UNet's blocks, {UNET_BLOCKS_FOR_BLOCK_LR} comma-separated values (0: frozen)",
    )
    parser.add_argument(
        "--fused_optimizer_groups",
        type=int,
        default=None,
        help="sd-scripts' grouped fused optimizer steps; here use --fused_backward_pass (refused when given)",
    )


def check_sdxl_flags(args: argparse.Namespace) -> None:
    """What sd-scripts' ``verify_sdxl_training_args`` checks: no ``--v2``; ``--clip_skip`` does nothing on SDXL."""
    if args.v2:
        raise UserError("--v2 names an SD 2.x model; an SDXL script trains SDXL models: drop --v2")
    if args.clip_skip is not None:
        logger.warning(
            "--clip_skip %s has no effect on SDXL: it always uses each text encoder's penultimate layer",
            args.clip_skip,
        )
