"""sd-scripts' ``train_db.py``: DreamBooth training of the full UNet and text encoder weights.

Takes DreamBooth-style data only (``--train_data_dir`` / ``--reg_data_dir`` folders named ``<repeats>_<class
tokens>``, or ``--dataset_config`` subsets with ``class_tokens`` / ``is_reg``); regularisation images keep the
class prior, weighted by ``--prior_loss_weight``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.parsers import full_model_parser
from library.config.values import Range


def setup_parser() -> argparse.ArgumentParser:
    parser = full_model_parser(__doc__)
    parser.add_argument("--no_token_padding", action="store_true", help="pad captions to the batch's longest only")
    parser.add_argument(
        "--stop_text_encoder_training",
        type=Range(int, -1).argtype(),
        default=None,
        help="steps to train the text encoder for (default: all), -1 to never train it",
    )
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    from library.engine.full_recipe import text_encoder_steps_for_db, train_full_model
    from library.engine.launch import load_base_model

    train_full_model(
        args,
        lambda seed: load_base_model(args),
        styles={"dreambooth"},
        text_encoder_steps=text_encoder_steps_for_db(args.stop_text_encoder_training),
        tracker_name=args.log_tracker_name or "dreambooth",
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
