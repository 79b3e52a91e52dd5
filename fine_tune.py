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
from library.errors import UserError


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
    from library.engine.full_recipe import train_full_model
    from library.engine.launch import load_base_model
    from library.models.scratch import scratch_model

    scratch = args.from_scratch_config
    if scratch and args.pretrained_model_name_or_path:
        raise UserError("--from_scratch_config and --pretrained_model_name_or_path exclude each other; pick one")

    def load(seed: int):
        if not scratch:
            return load_base_model(args)
        return scratch_model(
            scratch,
            seed=seed,
            v2=args.v2,
            v_parameterization=args.v_parameterization,
            vae=args.vae,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        )

    train_full_model(
        args,
        load,
        styles={"finetune"},
        text_encoder_steps=None if args.train_text_encoder else 0,
        tracker_name=args.log_tracker_name or "finetuning",
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
