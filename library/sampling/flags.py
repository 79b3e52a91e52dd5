"""sd-scripts' flags for sample images during training (names and defaults as in its train_util), and their values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from library.config.values import POSITIVE, POSITIVE_INT
from library.sampling.generate import SampleSettings
from library.sampling.samplers import SAMPLER_NAMES

if TYPE_CHECKING:
    import argparse


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """When and how sample images are made during training."""
    parser.add_argument(
        "--sample_every_n_steps", type=POSITIVE_INT.argtype(), default=None, help="generate sample images every N steps"
    )
    parser.add_argument(
        "--sample_every_n_minutes",
        type=POSITIVE.argtype(),
        default=None,
        help="also generate sample images every N minutes of training",
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


@dataclass(frozen=True)
class SampleFlags:
    """The flags sampling reads, under their own names (``settings_from_flags`` fills it); see :meth:`settings`."""

    sample_prompts: str | None = None
    output_dir: str | None = None
    output_name: str | None = None
    sample_sampler: str = "ddim"
    max_token_length: int | None = None
    clip_skip: int | None = None
    seed: int | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False

    def settings(self) -> SampleSettings | None:
        """The :class:`SampleSettings` these flags ask for; None without ``--sample_prompts``."""
        if not self.sample_prompts:
            return None
        return SampleSettings(
            prompts_file=Path(self.sample_prompts),
            output_dir=Path(self.output_dir or "."),
            output_name=self.output_name,
            default_sampler=self.sample_sampler or "ddim",
            max_token_length=self.max_token_length,
            clip_skip=self.clip_skip,
            training_seed=self.seed,
            every_n_steps=self.sample_every_n_steps,
            every_n_epochs=self.sample_every_n_epochs,
            at_first=self.sample_at_first,
        )
