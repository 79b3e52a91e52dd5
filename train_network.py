"""sd-scripts' ``train_network.py``: train a LoRA (or any ``--network_module``) on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config import engine_flags
from library.config.config_file import parse_args_with_config
from library.config.parsers import training_parser

logger = logging.getLogger("sdtrain")


def setup_parser() -> argparse.ArgumentParser:
    from library.metadata import add_metadata_arguments

    parser = training_parser(__doc__)
    engine_flags.add_saving_arguments(parser)
    engine_flags.add_network_arguments(parser)
    add_metadata_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    from library.dataset.loader import skipped_summary
    from library.engine import EngineConfig, train
    from library.engine.launch import load_base_model, prepare_training_data
    from library.engine.network_recipe import NetworkRecipe
    from library.engine.wiring import choose_seed, parts_from_args

    seed = choose_seed(args)
    config = dataclasses.replace(EngineConfig.from_args(args), seed=seed)
    components = load_base_model(args)
    dataset = prepare_training_data(args, {"dreambooth", "finetune"}, components, seed)
    if dataset is None:
        return
    recipe = NetworkRecipe(args, dataset)
    train(config, components, dataset, recipe, parts_from_args(args, components), summary=dataset.summary())
    if dataset.skipped:
        logger.warning(skipped_summary(dataset.skipped))


if __name__ == "__main__":
    sys.exit(run_cli(main))
