"""The flag groups every training script shares; each script then adds its saving options and its own flags."""

from __future__ import annotations

from library.cli import ArgumentParser
from library.config import engine_flags, flags, runtime_flags, train_flags
from library.config.config_file import add_config_arguments
from library.config.values import NON_NEGATIVE


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
        runtime_flags.add_runtime_arguments,
        train_flags.add_noise_arguments,
        train_flags.add_loss_arguments,
        train_flags.add_optimizer_arguments,
        add_sample_arguments,
        add_config_arguments,
    ):
        add(parser)
    return parser


def full_model_parser(description: str | None) -> ArgumentParser:
    """:func:`training_parser` plus what scripts saving a whole model share (train_db.py, fine_tune.py)."""
    from library.metadata import add_metadata_arguments
    from library.models.save import SAVE_FORMATS

    parser = training_parser(description)
    engine_flags.add_saving_arguments(parser, model_formats=SAVE_FORMATS, default_format=None)
    add_metadata_arguments(parser, network=False)
    parser.add_argument("--use_safetensors", action="store_true", help="without --save_model_as: save safetensors")
    parser.add_argument(
        "--learning_rate_te", type=NON_NEGATIVE.argtype(), default=None, help="text encoder LR (default: as UNet)"
    )
    return parser
