"""sd-scripts' flags for sample images during training (names and defaults as in its train_util)."""

from __future__ import annotations

import argparse

from library.config.values import POSITIVE_INT
from library.sampling.samplers import SAMPLER_NAMES


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """When and how sample images are made during training."""
    parser.add_argument(
        "--sample_every_n_steps", type=POSITIVE_INT.argtype(), default=None, help="generate sample images every N steps"
    )
    parser.add_argument("--sample_at_first", action="store_true", help="generate sample images before training")
    parser.add_argument(
        "--sample_every_n_epochs",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="generate sample images every N epochs (overrides --sample_every_n_steps)",
    )
    parser.add_argument(
        "--sample_prompts", type=str, default=None, help="file of prompts for sample images (.txt, .toml or .json)"
    )
    parser.add_argument(
        "--sample_sampler",
        type=str,
        default="ddim",
        choices=list(SAMPLER_NAMES),
        help="sampler (scheduler) for sample images",
    )
