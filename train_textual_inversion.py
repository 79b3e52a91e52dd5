"""sd-scripts' ``train_textual_inversion.py``: learn a new token's embedding on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from library.cli import run_cli
from library.config import engine_flags
from library.config.config_file import parse_args_with_config
from library.config.parsers import training_parser
from library.config.sdxl_flags import SD_FAMILIES
from library.config.settings import settings_from_flags
from library.config.values import Range
from library.errors import UserError
from library.metadata import MetadataSettings, add_metadata_arguments
from library.recipes.settings import TextualInversionSettings

if TYPE_CHECKING:
    from library.recipes.textual_inversion import TextualInversionRecipe

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


def run(
    args: argparse.Namespace, *, xti: bool = False, families: Collection[str] = SD_FAMILIES
) -> TextualInversionRecipe:
    """Train with parsed flags on a model of ``families`` (``xti``: one embedding per cross-attention layer);
    returns the trained recipe."""
    if xti and args.v2:
        raise UserError("--v2: train_textual_inversion_XTI.py supports SD 1.x only; use train_textual_inversion.py")
    from library.engine.launch import prepare_run
    from library.engine.wiring import read_sample_settings
    from library.recipes.textual_inversion import TemplateCaptions, TextualInversionRecipe, check_token_in_captions

    if args.output_name is None:
        args = argparse.Namespace(**{**vars(args), "output_name": args.token_string})
    settings = settings_from_flags(TextualInversionSettings, args, metadata=settings_from_flags(MetadataSettings, args))
    recipe = TextualInversionRecipe(settings, xti=xti)
    prepared = prepare_run(args, {"dreambooth", "finetune"}, text_embedding=True, families=families)
    if prepared is None:
        return recipe
    source, summary = prepared.dataset, prepared.summary
    if settings.templates is None:
        check_token_in_captions(source, settings.token_string)
    else:
        source = TemplateCaptions(source, settings.templates, settings.token_string)
        summary = source.describe(summary)
    parts = recipe.training_parts(prepared.parts, read_sample_settings(args))
    prepared.train(recipe, parts=parts, source=source, summary=summary, tracker_name="textual_inversion")
    return recipe


if __name__ == "__main__":
    sys.exit(run_cli(main))
