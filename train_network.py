"""sd-scripts' ``train_network.py``: train a LoRA (or any ``--network_module``) on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection, Sequence
from types import MappingProxyType

from library.cli import run_cli
from library.config import engine_flags
from library.config.config_file import parse_args_with_config
from library.config.parsers import training_parser
from library.config.sdxl_flags import SD_FAMILIES
from library.config.settings import settings_from_flags
from library.metadata import MetadataSettings, add_metadata_arguments
from library.recipes.settings import NetworkSettings

logger = logging.getLogger("sdtrain")


def setup_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = training_parser(description or __doc__)
    engine_flags.add_saving_arguments(parser)
    engine_flags.add_network_arguments(parser)
    add_metadata_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is not None:
        train(args)


def train(args: argparse.Namespace, families: Collection[str] = SD_FAMILIES) -> None:
    """Train a network on a base model of one of ``families`` (sdxl_train_network.py passes SDXL)."""
    from library.engine.launch import prepare_run
    from library.recipes.network import NetworkRecipe

    metadata = settings_from_flags(MetadataSettings, args)
    flags = MappingProxyType(dict(vars(args)))  # what a network module's prepare_network(args) may read
    settings = settings_from_flags(NetworkSettings, args, metadata=metadata, module_flags=flags)
    text_net = None if settings.network_train_unet_only else "a text-encoder network (add --network_train_unet_only)"
    run = prepare_run(args, {"dreambooth", "finetune"}, families=families, text_trained_by=text_net)
    if run is not None:
        run.train(NetworkRecipe(settings, run.summary), tracker_name="network_train")


if __name__ == "__main__":
    sys.exit(run_cli(main))
