"""Flags of the training loop: training length and precision, saving and state, logging, LoRA networks.

Names, types and defaults follow sd-scripts' ``train_util.add_training_arguments`` and ``train_network.py`` so
existing command lines and config files keep working; ``--nan_policy`` is ours. Sample flags live in
``library.sampling.flags`` and ``--no_metadata`` / ``--training_comment`` in ``library.metadata``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from library.config.values import ANY_NUMBER, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Range

logger = logging.getLogger("sdtrain")


class OneTextEncoderValue(argparse.Action):
    """sd-scripts takes one value per text encoder (``nargs="*"``) but trains them all at one rate, so the list
    collapses to one number: no values means unset (None), equal values mean that value, different values are an
    error (sd-scripts would silently use the first)."""

    @staticmethod
    def collapse(values: Sequence[Any] | Any) -> Any:
        """One value from sd-scripts' per-encoder list; ValueError when the values differ."""
        if not isinstance(values, (list, tuple)):
            return values
        distinct = list(dict.fromkeys(values))
        if len(distinct) > 1:
            raise ValueError(
                f"got different values {list(values)}, but networks.lora trains every text encoder at one rate "
                "(sd-scripts uses the first value for both SDXL encoders); give one value"
            )
        return distinct[0] if distinct else None

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, self.collapse(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """How long to train, with what precision and memory savings."""
    parser.add_argument(
        "--max_train_steps", type=POSITIVE_INT.argtype(), default=1600, help="number of optimizer steps to train"
    )
    parser.add_argument(
        "--max_train_epochs",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="number of epochs to train (overrides --max_train_steps)",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=POSITIVE_INT.argtype(),
        default=1,
        help="batches to accumulate before an optimizer step",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--full_fp16", action="store_true", help="train the trainable weights in fp16 too")
    parser.add_argument("--full_bf16", action="store_true", help="train the trainable weights in bf16 too")
    parser.add_argument(
        "--xformers", action="store_true", help="xformers attention in the UNet (CUDA only; else SDPA with a warning)"
    )
    parser.add_argument(
        "--mem_eff_attn", action="store_true", help="attention computed in slices of heads: less memory, slower"
    )
    parser.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    parser.add_argument("--lowram", action="store_true", help="load the model straight to the accelerator device")
    parser.add_argument(
        "--nan_policy",
        type=str,
        default="stop",
        choices=["stop", "skip"],
        help="on a NaN/inf loss: stop before saving poisoned weights (default) or skip that optimizer step",
    )
    add_ema_arguments(parser)
    add_window_arguments(parser)
    add_validation_arguments(parser)


def add_saving_arguments(
    parser: argparse.ArgumentParser,
    model_formats: tuple[str, ...] = ("ckpt", "pt", "safetensors"),
    default_format: str = "safetensors",
) -> None:
    """Where outputs go, how often models and training states are written and how many are kept."""
    parser.add_argument("--output_dir", type=str, default=None, help="folder for trained models and states")
    parser.add_argument("--output_name", type=str, default=None, help="base file name of trained models")
    parser.add_argument("--save_model_as", type=str, default=default_format, choices=list(model_formats))
    parser.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    parser.add_argument(
        "--save_every_n_epochs", type=POSITIVE_INT.argtype(), default=None, help="save a model every N epochs"
    )
    parser.add_argument(
        "--save_every_n_steps", type=POSITIVE_INT.argtype(), default=None, help="save a model every N steps"
    )
    parser.add_argument(
        "--save_n_epoch_ratio",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="save about N epoch models over the run (every max(1, epochs // N) epochs)",
    )
    parser.add_argument(
        "--save_last_n_epochs",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="keep only the last N epoch models (and states)",
    )
    parser.add_argument(
        "--save_last_n_epochs_state",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="keep only the last N epoch states",
    )
    parser.add_argument(
        "--save_last_n_steps",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="keep step models from the last N steps only",
    )
    parser.add_argument(
        "--save_last_n_steps_state",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="keep step states from the last N steps only",
    )
    parser.add_argument(
        "--save_state", action="store_true", help="write a resumable training state with every saved model"
    )
    parser.add_argument(
        "--backup_every_n_minutes",
        type=POSITIVE.argtype(),
        default=None,
        help="also write a training state (<name>-backup-step<N>-state) every N minutes of training",
    )
    parser.add_argument(
        "--backup_keep_last",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="keep only the N newest backups (default: keep all)",
    )
    parser.add_argument(
        "--save_state_on_train_end", action="store_true", help="write a resumable training state at the end"
    )
    parser.add_argument(
        "--resume",
        type=str,
        default=None,
        help="state folder to resume training from; 'latest': this run's newest state in --output_dir (none yet: "
        "start from the beginning)",
    )
    parser.add_argument(
        "--initial_step", type=NON_NEGATIVE_INT.argtype(), default=None, help="start counting steps from this step"
    )
    parser.add_argument(
        "--initial_epoch", type=POSITIVE_INT.argtype(), default=None, help="start counting from this epoch (1-based)"
    )
    parser.add_argument(
        "--skip_until_initial_step",
        action="store_true",
        help="with --initial_step/--initial_epoch: skip the batches before that point too",
    )
    add_hub_arguments(parser)


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' Hugging Face Hub flags: upload saved models (and states) to a repository, resume from one."""
    for name, what in (
        ("huggingface_repo_id", "Hub repository (namespace/name) each saved model is uploaded to"),
        ("huggingface_repo_type", "Hub repository type: model (default) or dataset"),
        ("huggingface_path_in_repo", "folder inside the Hub repository (default: its root)"),
        ("huggingface_token", "Hub token (never logged, never written by --output_config)"),
        ("huggingface_repo_visibility", "'public' or 'private' (default private) for a repository created here"),
    ):
        parser.add_argument(f"--{name}", type=str, default=None, help=what)
    for name, what in (
        ("save_state_to_huggingface", "upload training states too"),
        ("resume_from_huggingface", "--resume names a state on the Hub: {repo_id}/{path}[:{revision}[:{type}]]"),
        ("async_upload", "upload in the background, in order; the end of training waits for the uploads"),
    ):
        parser.add_argument(f"--{name}", action="store_true", help=what)


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """When the validation loss (held-out images: validation_split, is_val subsets) is computed."""
    for name, what in (
        ("validate_every_n_steps", "compute the validation loss every N steps"),
        ("validate_every_n_epochs", "compute the validation loss every N epochs"),
        ("max_validation_steps", "validation batches per validation run (default: all)"),
    ):
        parser.add_argument(f"--{name}", type=POSITIVE_INT.argtype(), default=None, help=what)


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """An exponential moving average of the trained weights, used for saving and sampling."""
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the trained weights; save and sample it")
    parser.add_argument(
        "--ema_decay",
        type=Range(float, 0.0, 1.0, low_open=True, high_open=True).argtype(),
        default=0.999,
        help="EMA decay (warm-up: min(decay, (1+t)/(10+t)) at step t)",
    )
    parser.add_argument(
        "--ema_update_every", type=POSITIVE_INT.argtype(), default=1, help="update the EMA every N optimizer steps"
    )
    parser.add_argument(
        "--ema_device", type=str, default="same", choices=["same", "cpu"], help="where the EMA lives (cpu saves VRAM)"
    )
    parser.add_argument(
        "--sample_without_ema", action="store_true", help="with --ema: also sample the raw weights (_noema files)"
    )


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-part training windows: a part stops learning after N steps (N, Nsteps) or epochs (Nepochs)."""
    for part in ("text_encoder", "unet"):
        parser.add_argument(
            f"--{part}_train_until",
            type=str,
            default=None,
            help=f"stop training the {part.replace('_', ' ')} after N steps (500, 500steps) or epochs (3epochs)",
        )


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """TensorBoard / Weights & Biases logging through accelerate's trackers."""
    parser.add_argument("--logging_dir", type=str, default=None, help="write TensorBoard logs under this folder")
    parser.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    parser.add_argument("--log_prefix", type=str, default=None, help="prefix of each run's log folder name")
    parser.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name")
    parser.add_argument("--log_tracker_config", type=str, default=None, help="TOML file of tracker init options")
    parser.add_argument("--wandb_run_name", type=str, default=None)
    parser.add_argument("--wandb_api_key", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log_config", action="store_true", help="log the training flags to the trackers")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The LoRA network to train (sd-scripts' train_network.py flags)."""
    parser.add_argument("--unet_lr", type=NON_NEGATIVE.argtype(), default=None, help="learning rate of the UNet part")
    parser.add_argument(
        "--text_encoder_lr",
        type=NON_NEGATIVE.argtype(),
        default=None,
        nargs="*",
        action=OneTextEncoderValue,
        help="learning rate of the text encoder part (sd-scripts' list form is accepted: SD1/2 have one encoder)",
    )
    parser.add_argument("--network_weights", type=str, default=None, help="start from these network weights")
    parser.add_argument("--network_module", type=str, default="networks.lora", help="module that builds the network")
    parser.add_argument(
        "--network_dim", type=POSITIVE_INT.argtype(), default=None, help="network rank (the module's default if unset)"
    )
    parser.add_argument(
        "--network_alpha", type=NON_NEGATIVE.argtype(), default=1, help="LoRA alpha; scale = alpha / dim"
    )
    parser.add_argument(
        "--network_dropout",
        type=Range(float, 0.0, 1.0, high_open=True).argtype(),
        default=None,
        help="dropout on the network's neurons (0 to below 1)",
    )
    parser.add_argument("--network_args", type=str, default=None, nargs="*", help="extra key=value network options")
    parser.add_argument("--network_train_unet_only", action="store_true")
    parser.add_argument("--network_train_text_encoder_only", action="store_true")
    parser.add_argument(
        "--dim_from_weights", action="store_true", help="take the network's shape from --network_weights"
    )
    parser.add_argument(
        "--scale_weight_norms",
        type=NON_NEGATIVE.argtype(),
        default=None,
        help="max-norm regularisation of the network's weights",
    )
    parser.add_argument("--base_weights", type=str, default=None, nargs="*", help="networks merged before training")
    parser.add_argument("--base_weights_multiplier", type=ANY_NUMBER.argtype(), default=None, nargs="*")
