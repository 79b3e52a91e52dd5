"""sd-scripts' ``train_network.py``: train a LoRA (or any ``--network_module``) on a frozen SD 1.x/2.x model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.config import engine_flags, flags, train_flags
from library.config.config_file import add_config_arguments, parse_args_with_config
from library.errors import UserError

logger = logging.getLogger("sdtrain")


def setup_parser() -> argparse.ArgumentParser:
    from library.metadata import add_metadata_arguments
    from library.sampling.flags import add_sample_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    for add in (
        flags.add_logging_arguments,
        flags.add_model_arguments,
        flags.add_text_encoding_arguments,
        flags.add_dataset_arguments,
        engine_flags.add_training_arguments,
        engine_flags.add_saving_arguments,
        engine_flags.add_tracking_arguments,
        engine_flags.add_network_arguments,
        train_flags.add_noise_arguments,
        train_flags.add_loss_arguments,
        train_flags.add_optimizer_arguments,
        add_sample_arguments,
        add_metadata_arguments,
        add_config_arguments,
    ):
        add(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is None:
        return
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a diffusers folder, repo id or model file")
    from library.dataset.loader import build_train_dataset, skipped_summary
    from library.engine import EngineConfig, train
    from library.engine.attention import attention_from_args
    from library.engine.network_recipe import NetworkRecipe
    from library.engine.tracking import launch_device, launched_processes
    from library.engine.wiring import choose_seed, parts_from_args
    from library.models.load import load_model

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
    attention_from_args(args, components.unet, launch_device())
    components.vae.to(launch_device())
    dataset = build_train_dataset(args, {"dreambooth", "finetune"}, components.vae, seed=seed)
    if args.debug_dataset:
        from library.dataset.debug import debug_dataset

        debug_dataset(dataset, out_dir=args.debug_dataset_dir)
        return
    if args.max_train_epochs is not None:
        per_process = math.ceil(len(dataset.batch_plan(1)) / launched_processes())
        steps = args.max_train_epochs * math.ceil(per_process / args.gradient_accumulation_steps)
        dataset = dataset.with_changes(max_train_steps=steps)
    else:
        dataset = dataset.with_changes(max_train_steps=args.max_train_steps)
    recipe = NetworkRecipe(args, dataset)
    train(config, components, dataset, recipe, parts_from_args(args, components), summary=dataset.summary())
    if dataset.skipped:
        logger.warning(skipped_summary(dataset.skipped))


if __name__ == "__main__":
    sys.exit(run_cli(main))
