"""sd-scripts' ``sdxl_train.py``: fine-tune an SDXL model's full UNet (and with ``--train_text_encoder`` its two text
encoders), from DreamBooth-style folders or fine-tuning metadata.

``--learning_rate_te1``/``--learning_rate_te2`` set each text encoder's rate (0 freezes it), ``--block_lr`` the
rates of the UNet's 23 blocks; models are saved in sd-scripts' formats (ckpt, safetensors, diffusers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config import engine_flags
from library.config.config_file import parse_args_with_config
from library.config.parsers import training_parser
from library.config.sdxl_flags import SDXL_FAMILIES, add_sdxl_arguments, add_sdxl_full_arguments, check_sdxl_flags
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.metadata import MetadataSettings, add_metadata_arguments
from library.recipes.settings import FullModelSettings


def setup_parser() -> argparse.ArgumentParser:
    from library.models.save import SAVE_FORMATS

    parser = training_parser(__doc__)
    engine_flags.add_saving_arguments(parser, model_formats=SAVE_FORMATS, default_format=None)
    add_metadata_arguments(parser, network=False)
    parser.add_argument("--use_safetensors", action="store_true", help="without --save_model_as: save safetensors")
    parser.add_argument("--diffusers_xformers", action="store_true", help="use xformers through diffusers")
    add_sdxl_arguments(parser)
    add_sdxl_full_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    check_sdxl_flags(args)
    if args.fused_optimizer_groups:
        raise UserError(
            f"--fused_optimizer_groups {args.fused_optimizer_groups}: grouped fused optimizers are not supported; "
            "use --fused_backward_pass (one fused step per parameter, the same memory saving)"
        )
    from library.engine.launch import prepare_run
    from library.recipes.full import train_full_model

    settings = settings_from_flags(FullModelSettings, args, metadata=settings_from_flags(MetadataSettings, args))
    trains_text = "--train_text_encoder" if settings.train_text_encoder else None
    run = prepare_run(args, {"dreambooth", "finetune"}, families=SDXL_FAMILIES, text_trained_by=trains_text)
    steps = None if settings.train_text_encoder else 0
    train_full_model(run, settings, text_encoder_steps=steps, tracker_name="finetuning")


if __name__ == "__main__":
    sys.exit(run_cli(main))
