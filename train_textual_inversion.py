"""sd-scripts' ``train_textual_inversion.py``: learn a new token's embedding on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from library.cli import run_cli
from library.config import engine_flags, flags, train_flags
from library.config.config_file import add_config_arguments, parse_args_with_config
from library.errors import UserError

if TYPE_CHECKING:
    from library.engine.ti_recipe import TextualInversionRecipe

logger = logging.getLogger("sdtrain")


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' textual inversion flags."""
    parser.add_argument("--weights", type=str, default=None, help="embedding file to continue training from")
    parser.add_argument("--num_vectors_per_token", type=int, default=1, help="vectors (tokens) of the embedding")
    parser.add_argument("--token_string", type=str, default=None, help="the new word; must not exist in the tokenizer")
    parser.add_argument("--init_word", type=str, default=None, help="word(s) whose embedding starts the vectors")
    parser.add_argument("--use_object_template", action="store_true", help="train on object templates, not captions")
    parser.add_argument("--use_style_template", action="store_true", help="train on style templates, not captions")


def setup_parser(description: str | None = None) -> argparse.ArgumentParser:
    from library.metadata import add_metadata_arguments
    from library.sampling.flags import add_sample_arguments

    parser = argparse.ArgumentParser(description=description or __doc__)
    flags.add_logging_arguments(parser)
    flags.add_model_arguments(parser)
    flags.add_text_encoding_arguments(parser)
    flags.add_dataset_arguments(parser)
    engine_flags.add_training_arguments(parser)
    engine_flags.add_saving_arguments(parser, default_format="pt")
    engine_flags.add_tracking_arguments(parser)
    for add in (train_flags.add_noise_arguments, train_flags.add_loss_arguments, train_flags.add_optimizer_arguments):
        add(parser)
    add_sample_arguments(parser)
    add_metadata_arguments(parser, network=False)
    add_textual_inversion_arguments(parser)
    add_config_arguments(parser)
    return parser


def main(argv: Sequence[str], *, xti: bool = False) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    run(args, xti=xti)


def run(args: argparse.Namespace, *, xti: bool = False) -> TextualInversionRecipe:
    """Train with parsed flags; ``xti`` trains one embedding per UNet cross-attention layer. Returns the recipe,
    which holds the trained embedding module."""
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a diffusers folder, repo id or model file")
    if xti and args.v2:
        raise UserError("--v2: train_textual_inversion_XTI.py supports SD 1.x only; use train_textual_inversion.py")
    from library.dataset.loader import build_train_dataset, skipped_summary
    from library.engine import EngineConfig, train
    from library.engine.ti_recipe import (
        TemplateCaptions,
        TextualInversionRecipe,
        check_token_in_captions,
        templates_from_args,
    )
    from library.engine.tracking import launch_device, launched_processes
    from library.engine.wiring import choose_seed, parts_from_args
    from library.models.load import load_model

    if args.output_name is None:
        args = argparse.Namespace(**{**vars(args), "output_name": args.token_string})
    recipe = TextualInversionRecipe(args, xti=xti)
    templates = templates_from_args(args)
    seed = choose_seed(args)
    config = dataclasses.replace(EngineConfig.from_args(args), seed=seed)
    components = load_model(
        args.pretrained_model_name_or_path,
        v2=args.v2 or None,
        v_parameterization=args.v_parameterization or None,
        vae=args.vae,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
    )
    if args.xformers:
        try:
            components.unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise UserError(f"--xformers: cannot enable xformers ({e}); install it or use --sdpa") from e
    components.vae.to(launch_device())
    dataset = build_train_dataset(args, {"dreambooth", "finetune"}, components.vae, seed=seed)
    if templates is None:
        check_token_in_captions(dataset, args.token_string)
    if args.max_train_epochs is not None:
        per_process = math.ceil(len(dataset.batch_plan(1)) / launched_processes())
        steps = args.max_train_epochs * math.ceil(per_process / args.gradient_accumulation_steps)
        dataset = dataset.with_changes(max_train_steps=steps)
    else:
        dataset = dataset.with_changes(max_train_steps=args.max_train_steps)
    source = dataset if templates is None else TemplateCaptions(dataset, templates, args.token_string)
    parts = recipe.training_parts(parts_from_args(args, components))
    train(config, components, source, recipe, parts, tracker_name="textual_inversion", summary=source.summary())
    if dataset.skipped:
        logger.warning(skipped_summary(dataset.skipped))
    return recipe


if __name__ == "__main__":
    sys.exit(run_cli(main))
