"""sd-scripts' ``train_textual_inversion.py``: learn a new token's embedding on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from library.cli import run_cli
from library.config import engine_flags
from library.config.config_file import parse_args_with_config
from library.config.parsers import training_parser
from library.config.values import Range
from library.errors import UserError

if TYPE_CHECKING:
    from library.engine.ti_recipe import TextualInversionRecipe

logger = logging.getLogger("sdtrain")


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' textual inversion flags."""
    parser.add_argument("--weights", type=str, default=None, help="embedding file to continue training from")
    parser.add_argument(
        "--num_vectors_per_token", type=Range(int, 1, 75).argtype(), default=1, help="vectors (tokens) of the embedding"
    )
    parser.add_argument("--token_string", type=str, default=None, help="the new word; must not exist in the tokenizer")
    parser.add_argument("--init_word", type=str, default=None, help="word(s) whose embedding starts the vectors")
    parser.add_argument("--use_object_template", action="store_true", help="train on object templates, not captions")
    parser.add_argument("--use_style_template", action="store_true", help="train on style templates, not captions")


def setup_parser(description: str | None = None) -> argparse.ArgumentParser:
    from library.metadata import add_metadata_arguments

    parser = training_parser(description or __doc__)
    engine_flags.add_saving_arguments(parser, default_format="pt")
    add_metadata_arguments(parser, network=False)
    add_textual_inversion_arguments(parser)
    return parser


def main(argv: Sequence[str], *, xti: bool = False) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    run(args, xti=xti)


def run(args: argparse.Namespace, *, xti: bool = False) -> TextualInversionRecipe:
    """Train with parsed flags; ``xti`` trains one embedding per UNet cross-attention layer. Returns the recipe,
    which holds the trained embedding module."""
    if xti and args.v2:
        raise UserError("--v2: train_textual_inversion_XTI.py supports SD 1.x only; use train_textual_inversion.py")
    from library.dataset.loader import skipped_summary
    from library.engine import EngineConfig, train
    from library.engine.launch import load_base_model, prepare_training_data
    from library.engine.ti_recipe import (
        TemplateCaptions,
        TextualInversionRecipe,
        check_token_in_captions,
        templates_from_args,
    )
    from library.engine.wiring import choose_seed, parts_from_args

    if args.output_name is None:
        args = argparse.Namespace(**{**vars(args), "output_name": args.token_string})
    recipe = TextualInversionRecipe(args, xti=xti)
    templates = templates_from_args(args)
    seed = choose_seed(args)
    config = dataclasses.replace(EngineConfig.from_args(args), seed=seed)
    components = load_base_model(args)
    dataset = prepare_training_data(args, {"dreambooth", "finetune"}, components, seed)
    if dataset is None:
        return recipe
    if templates is None:
        check_token_in_captions(dataset, args.token_string)
    source = dataset if templates is None else TemplateCaptions(dataset, templates, args.token_string)
    parts = recipe.training_parts(parts_from_args(args, components))
    train(config, components, source, recipe, parts, tracker_name="textual_inversion", summary=source.summary())
    if dataset.skipped:
        logger.warning(skipped_summary(dataset.skipped))
    return recipe


if __name__ == "__main__":
    sys.exit(run_cli(main))
