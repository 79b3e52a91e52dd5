"""sd-scripts' ``train_db.py``: DreamBooth training of the full UNet and text encoder weights.

Takes DreamBooth-style data only (``--train_data_dir`` / ``--reg_data_dir`` folders named ``<repeats>_<class
tokens>``, or ``--dataset_config`` subsets with ``class_tokens`` / ``is_reg``); regularisation images keep the
class prior, weighted by ``--prior_loss_weight``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.parsers import full_model_parser
from library.config.settings import settings_from_flags
from library.config.values import Range
from library.metadata import MetadataSettings
from library.recipes.settings import FullModelSettings

logger = logging.getLogger("sdtrain")


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
    from library.engine.launch import prepare_run
    from library.recipes.full import text_encoder_steps_for_db, train_full_model

    settings = settings_from_flags(FullModelSettings, args, metadata=settings_from_flags(MetadataSettings, args))
    steps = text_encoder_steps_for_db(settings.stop_text_encoder_training)
    train_full_model(prepare_run(args, {"dreambooth"}), settings, text_encoder_steps=steps, tracker_name="dreambooth")


if __name__ == "__main__":
    sys.exit(run_cli(main))
