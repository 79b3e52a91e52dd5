"""sd-scripts' flags for noise, loss, optimizer and learning-rate schedule, with its names and defaults."""

from __future__ import annotations

import argparse
import math

from library.config.values import ANY_NUMBER, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, Range


def int_or_ratio(value: str) -> int | float:
    """Parse a step count flag: ``"10"`` is 10 steps, ``"0.1"`` or ``"10%"`` is a ratio of the training steps."""
    text = value.strip()
    try:
        number = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio below 1 or a percentage") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio below 1 or a percentage")
    if text.endswith("%"):
        if not 0 <= number <= 100:
            raise argparse.ArgumentTypeError(f"{value!r}: a percentage must be from 0% to 100%")
        return number / 100.0
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative: use a step count, a ratio below 1 or a percentage")
    if number < 1:
        return number
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of steps (ratios must be below 1)")
    return int(number)


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Noise and timestep flags (part of sd-scripts' add_training_arguments)."""
    parser.add_argument(
        "--noise_offset", type=NON_NEGATIVE.argtype(), default=None, help="offset noise strength (about 0.1)"
    )
    parser.add_argument(
        "--noise_offset_random_strength", action="store_true", help="draw the offset strength from [0, noise_offset)"
    )
    parser.add_argument(
        "--multires_noise_iterations",
        type=NON_NEGATIVE_INT.argtype(),
        default=None,
        help="multi-resolution noise levels (about 6-10)",
    )
    parser.add_argument(
        "--multires_noise_discount",
        type=PROBABILITY.argtype(),
        default=0.3,
        help="weight decay per multi-resolution level",
    )
    parser.add_argument(
        "--adaptive_noise_scale",
        type=ANY_NUMBER.argtype(),
        default=None,
        help="add |latent channel mean| times this to noise_offset (needs --noise_offset)",
    )
    parser.add_argument(
        "--ip_noise_gamma", type=NON_NEGATIVE.argtype(), default=None, help="input perturbation noise (about 0.1)"
    )
    parser.add_argument(
        "--ip_noise_gamma_random_strength", action="store_true", help="draw the strength from [0, ip_noise_gamma)"
    )
    parser.add_argument(
        "--zero_terminal_snr", action="store_true", help="rescale the betas so the last timestep has zero SNR"
    )
    parser.add_argument(
        "--min_timestep",
        type=Range(int, 0, 999).argtype(),
        default=None,
        help="lowest timestep trained (0-999, default 0)",
    )
    parser.add_argument(
        "--max_timestep",
        type=Range(int, 1, 1000).argtype(),
        default=None,
        help="timesteps are drawn below this (1-1000, default 1000)",
    )
    parser.add_argument(
        "--timestep_distribution",
        type=str,
        default="uniform",
        choices=["uniform", "logit_normal", "sigmoid", "heavy_tail", "cos_map"],
        help="how training timesteps are drawn (OneTrainer's distributions; uniform is sd-scripts' draw)",
    )
    parser.add_argument(
        "--min_noising_strength",
        type=PROBABILITY.argtype(),
        default=None,
        help="lowest timestep as a fraction of the schedule (0-1; instead of --min_timestep)",
    )
    parser.add_argument(
        "--max_noising_strength",
        type=PROBABILITY.argtype(),
        default=None,
        help="timesteps are drawn below this fraction of the schedule (0-1; instead of --max_timestep)",
    )
    parser.add_argument(
        "--noising_weight",
        type=ANY_NUMBER.argtype(),
        default=0.0,
        help="shape of the distribution: logit_normal std - 1, sigmoid slope, heavy_tail scale (-1 to 1.75)",
    )
    parser.add_argument(
        "--noising_bias",
        type=ANY_NUMBER.argtype(),
        default=0.0,
        help="shift of the distribution: logit_normal mean, sigmoid centre - 0.5",
    )


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Loss flags (sd-scripts' loss_type/huber flags, --masked_loss and add_custom_train_arguments' weightings)."""
    parser.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=["constant", "exponential", "snr"],
        help="how the Huber threshold varies with the timestep (huber and smooth_l1 only)",
    )
    parser.add_argument("--huber_c", type=POSITIVE.argtype(), default=0.1, help="Huber threshold parameter")
    parser.add_argument("--huber_scale", type=POSITIVE.argtype(), default=1.0, help="Huber threshold scale")
    parser.add_argument("--masked_loss", action="store_true", help="weight the loss by the dataset's masks")
    parser.add_argument(
        "--min_snr_gamma",
        type=POSITIVE.argtype(),
        default=None,
        help="min-SNR weighting gamma (5 is recommended by the paper)",
    )
    parser.add_argument(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help="scale the v-prediction loss like a noise-prediction loss",
    )
    parser.add_argument(
        "--v_pred_like_loss",
        type=NON_NEGATIVE.argtype(),
        default=None,
        help="add a v-prediction-like loss times this value",
    )
    parser.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    for name, what in (
        ("mse", "squared error"),
        ("mae", "absolute error"),
        ("log_cosh", "log-cosh"),
        ("huber", "Huber"),
    ):
        parser.add_argument(
            f"--{name}_strength",
            type=NON_NEGATIVE.argtype(),
            default=None,
            help=f"weight of the {what} loss in a mix (OneTrainer); any *_strength replaces --loss_type",
        )
    parser.add_argument(
        "--p2_loss_weight_gamma",
        type=NON_NEGATIVE.argtype(),
        default=None,
        help="P2 loss weighting (k + snr)^-gamma (1 is typical); multiplies with min-SNR if both are given",
    )
    parser.add_argument("--p2_loss_weight_k", type=POSITIVE.argtype(), default=1.0, help="P2 weighting's k")
    parser.add_argument(
        "--unmasked_probability",
        type=PROBABILITY.argtype(),
        default=0.0,
        help="fraction of samples trained as if unmasked (masked training only)",
    )
    parser.add_argument(
        "--unmasked_weight",
        type=PROBABILITY.argtype(),
        default=0.0,
        help="loss weight outside the mask: mask becomes w + (1 - w) * mask (masked training only)",
    )
    parser.add_argument(
        "--normalize_masked_area_loss",
        action="store_true",
        help="divide each sample's masked loss by its mask's mean (masked training only)",
    )


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and learning-rate schedule flags (sd-scripts' add_optimizer_arguments)."""
    parser.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, "
        "SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdam, DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, "
        "DAdaptSGD, Prodigy, AdaFactor, RAdamScheduleFree, AdamWScheduleFree, SGDScheduleFree, any torch.optim name "
        "or a full path module.Class",
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    parser.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")
    parser.add_argument("--learning_rate", type=NON_NEGATIVE.argtype(), default=2.0e-6, help="learning rate")
    parser.add_argument(
        "--max_grad_norm", type=NON_NEGATIVE.argtype(), default=1.0, help="gradient clipping norm, 0 for none"
    )
    parser.add_argument(
        "--optimizer_args",
        type=str,
        default=None,
        nargs="*",
        help='extra optimizer arguments as key=value Python literals, e.g. "weight_decay=0.01 betas=0.9,0.999"',
    )
    parser.add_argument(
        "--lr_scheduler_type", type=str, default="", help="custom scheduler class: Name or module.Class"
    )
    parser.add_argument(
        "--lr_scheduler_args", type=str, default=None, nargs="*", help='extra scheduler arguments, e.g. "T_max=100"'
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="linear, cosine, cosine_with_restarts, polynomial, constant (default), constant_with_warmup, adafactor, "
        "or another transformers scheduler name",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=int_or_ratio,
        default=0,
        help="warmup steps: a count, a ratio of the training steps below 1, or a percentage like 10%%",
    )
    parser.add_argument(
        "--lr_decay_steps",
        type=int_or_ratio,
        default=0,
        help="decay steps (warmup_stable_decay): a count, a ratio below 1, or a percentage",
    )
    parser.add_argument(
        "--lr_scheduler_num_cycles", type=POSITIVE_INT.argtype(), default=1, help="restarts for cosine_with_restarts"
    )
    parser.add_argument(
        "--lr_scheduler_power", type=NON_NEGATIVE.argtype(), default=1, help="power for the polynomial scheduler"
    )
    parser.add_argument(
        "--lr_scheduler_timescale",
        type=POSITIVE_INT.argtype(),
        default=None,
        help="timescale for inverse_sqrt (default: warmup steps)",
    )
    parser.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=PROBABILITY.argtype(),
        default=None,
        help="minimum LR as a ratio of the initial LR (cosine_with_min_lr, warmup_stable_decay)",
    )
    parser.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="step the optimizer per parameter during backward and free each gradient (AdamW, AdaFactor)",
    )
