"""Resize a LoRA/LoCon file to another rank, as sd-scripts' networks/resize_lora.py: each module's ΔW is re-factored
by SVD to ``--new_rank`` (``--new_conv_rank`` for conv modules) or, with ``--dynamic_method``, to the rank that
keeps ``--dynamic_param`` of it (sv_ratio, sv_fro, sv_cumulative; ``--new_rank`` is the cap); alpha is rescaled so
the strength is unchanged. LoHa/LoKr/full/OFT and DoRA files are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.lora_tools.resize import ResizeSettings, resize_lora


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=[None, "float", "fp16", "bf16"],
        help="precision to save in (default float)",
    )
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output LoRA (the cap for dynamic methods)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank for conv modules (default: --new_rank)")
    parser.add_argument("--save_to", type=str, default=None, help="file to write: .safetensors, .ckpt, .pt or .pth")
    parser.add_argument("--model", type=str, default=None, help="LoRA file to resize: .safetensors, .ckpt or .pt")
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda")
    parser.add_argument("--verbose", action="store_true", help="print what each module keeps")
    parser.add_argument(
        "--dynamic_method",
        type=str,
        default=None,
        choices=[None, "sv_ratio", "sv_fro", "sv_cumulative"],
        help="choose each module's rank from its singular values; --new_rank is the maximum",
    )
    parser.add_argument("--dynamic_param", type=float, default=None, help="target for the dynamic method")
    return parser


def main(argv: Sequence[str]) -> None:
    resize_lora(settings_from_flags(ResizeSettings, setup_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
