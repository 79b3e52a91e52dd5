"""The flag groups every training script shares; each script then adds its saving options and its own flags."""

from __future__ import annotations

from library.cli import ArgumentParser
from library.config import engine_flags, flags, train_flags
from library.config.config_file import add_config_arguments


def training_parser(description: str | None) -> ArgumentParser:
    """Model, text, dataset, loop, logging, noise/loss, optimizer, sampling and ``--config_file`` flags."""
    from library.sampling.flags import add_sample_arguments

    parser = ArgumentParser(description=description)
    for add in (
        flags.add_logging_arguments,
        flags.add_model_arguments,
        flags.add_text_encoding_arguments,
        flags.add_dataset_arguments,
        engine_flags.add_training_arguments,
        engine_flags.add_tracking_arguments,
        train_flags.add_noise_arguments,
        train_flags.add_loss_arguments,
        train_flags.add_optimizer_arguments,
        add_sample_arguments,
        add_config_arguments,
    ):
        add(parser)
    return parser
