"""sd-scripts' ``fine_tune.py``: fine-tuning of the full UNet (and with ``--train_text_encoder`` the text encoder).

Takes fine-tuning-style data only (``--in_json`` metadata with ``--train_data_dir``, or ``--dataset_config``
subsets with ``metadata_file``). ``--from_scratch_config`` starts from random weights of a given architecture.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.parsers import full_model_parser
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.metadata import MetadataSettings
from library.recipes.settings import FullModelSettings


def setup_parser() -> argparse.ArgumentParser:
    parser = full_model_parser(__doc__)
    parser.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    parser.add_argument("--diffusers_xformers", action="store_true", help="use xformers through diffusers")
    parser.add_argument(
        "--from_scratch_config",
        type=str,
        default=None,
        help="start from random weights: a folder with unet/vae/text_encoder config.json, or tiny-sd1 / tiny-sd2",
    )
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    from library.engine.launch import prepare_run
    from library.models.scratch import scratch_model
    from library.recipes.full import train_full_model

    settings = settings_from_flags(FullModelSettings, args, metadata=settings_from_flags(MetadataSettings, args))
    scratch = settings.from_scratch_config
    if scratch and args.pretrained_model_name_or_path:
        raise UserError("--from_scratch_config and --pretrained_model_name_or_path exclude each other; pick one")

    def from_scratch(seed: int):
        return scratch_model(
            scratch,
            seed=seed,
            v2=args.v2,
            v_parameterization=args.v_parameterization,
            vae=args.vae,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        )

    run = prepare_run(args, {"finetune"}, load=from_scratch if scratch else None)
    steps = None if settings.train_text_encoder else 0
    train_full_model(run, settings, text_encoder_steps=steps, tracker_name="finetuning")


if __name__ == "__main__":
    sys.exit(run_cli(main))
