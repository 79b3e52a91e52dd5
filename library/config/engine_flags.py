"""Flags of the training loop: training length and precision, saving and state, logging, LoRA networks.

Names, types and defaults follow sd-scripts' ``train_util.add_training_arguments`` and ``train_network.py`` so
existing command lines and config files keep working; ``--nan_policy`` is ours. Sample flags live in
``library.sampling.flags`` and ``--no_metadata`` / ``--training_comment`` in ``library.metadata``.
"""

from __future__ import annotations

import argparse


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """How long to train, with what precision and memory savings."""
    parser.add_argument("--max_train_steps", type=int, default=1600, help="number of optimizer steps to train")
    parser.add_argument(
        "--max_train_epochs", type=int, default=None, help="number of epochs to train (overrides --max_train_steps)"
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches to accumulate before an optimizer step"
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
    parser.add_argument("--save_every_n_epochs", type=int, default=None, help="save a model every N epochs")
    parser.add_argument("--save_every_n_steps", type=int, default=None, help="save a model every N steps")
    parser.add_argument(
        "--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch models (and states)"
    )
    parser.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    parser.add_argument(
        "--save_last_n_steps", type=int, default=None, help="keep step models from the last N steps only"
    )
    parser.add_argument(
        "--save_last_n_steps_state", type=int, default=None, help="keep step states from the last N steps only"
    )
    parser.add_argument(
        "--save_state", action="store_true", help="write a resumable training state with every saved model"
    )
    parser.add_argument(
        "--save_state_on_train_end", action="store_true", help="write a resumable training state at the end"
    )
    parser.add_argument("--resume", type=str, default=None, help="state folder to resume training from")
    parser.add_argument("--initial_step", type=int, default=None, help="start counting steps from this step")
    parser.add_argument("--initial_epoch", type=int, default=None, help="start counting from this epoch (1-based)")
    parser.add_argument(
        "--skip_until_initial_step",
        action="store_true",
        help="with --initial_step/--initial_epoch: skip the batches before that point too",
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
    parser.add_argument("--unet_lr", type=float, default=None, help="learning rate of the UNet part")
    parser.add_argument("--text_encoder_lr", type=float, default=None, help="learning rate of the text encoder part")
    parser.add_argument("--network_weights", type=str, default=None, help="start from these network weights")
    parser.add_argument("--network_module", type=str, default="networks.lora", help="module that builds the network")
    parser.add_argument("--network_dim", type=int, default=None, help="network rank (the module's default if unset)")
    parser.add_argument("--network_alpha", type=float, default=1, help="LoRA alpha; scale = alpha / dim")
    parser.add_argument("--network_dropout", type=float, default=None, help="dropout on the network's neurons")
    parser.add_argument("--network_args", type=str, default=None, nargs="*", help="extra key=value network options")
    parser.add_argument("--network_train_unet_only", action="store_true")
    parser.add_argument("--network_train_text_encoder_only", action="store_true")
    parser.add_argument(
        "--dim_from_weights", action="store_true", help="take the network's shape from --network_weights"
    )
    parser.add_argument(
        "--scale_weight_norms", type=float, default=None, help="max-norm regularisation of the network's weights"
    )
    parser.add_argument("--base_weights", type=str, default=None, nargs="*", help="networks merged before training")
    parser.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*")
