"""Extract a LoRA from the difference between two models, as sd-scripts' networks/extract_lora_from_models.py:
``--model_tuned`` minus ``--model_org`` on networks.lora's target layers, truncated by SVD to ``--dim``
(``--conv_dim`` for 3x3 convs), alpha = rank; the text encoder is left out when it changed by at most
``--min_diff``. Models: single files, diffusers folders or the tiny presets; SD 1.x/2.x and SDXL.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.lora_tools.extract import ExtractSettings, extract_lora

PRECISION_CHOICES = [None, "float", "fp16", "bf16"]


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--v2", action="store_true", help="the models are Stable Diffusion 2.x")
    parser.add_argument(
        "--v_parameterization",
        action="store_true",
        default=None,
        help="write v-parameterization metadata (default: the model's own prediction type)",
    )
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL (detected anyway)")
    parser.add_argument(
        "--load_precision", type=str, default=None, choices=PRECISION_CHOICES, help="precision to load the models in"
    )
    parser.add_argument(
        "--save_precision", type=str, default=None, choices=PRECISION_CHOICES, help="precision to save in (float)"
    )
    parser.add_argument("--model_org", type=str, required=True, help="original model: file, diffusers folder, tiny-*")
    parser.add_argument("--model_tuned", type=str, required=True, help="tuned model; the LoRA is tuned minus original")
    parser.add_argument("--save_to", type=str, required=True, help="LoRA file to write (.safetensors, .ckpt, .pt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument(
        "--conv_dim", type=int, default=None, help="rank for 3x3 conv layers (default None: no conv layers)"
    )
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda")
    parser.add_argument(
        "--clamp_quantile", type=float, default=0.99, help="clamp the factors at this quantile (0-1, default 0.99)"
    )
    parser.add_argument(
        "--min_diff",
        type=float,
        default=0.01,
        help="the text encoder is extracted only if some weight changed by more than this (default 0.01)",
    )
    parser.add_argument("--no_metadata", action="store_true", help="write no modelspec metadata (ss_* still written)")
    parser.add_argument("--load_original_model_to", type=str, default=None, help="device for the original model")
    parser.add_argument("--load_tuned_model_to", type=str, default=None, help="device for the tuned model")
    return parser


def main(argv: Sequence[str]) -> None:
    extract_lora(settings_from_flags(ExtractSettings, setup_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
