"""Merge LoRA-family files into one LoRA by SVD, as sd-scripts' networks/svd_merge_lora.py: every file's ΔW (LoRA,
LoCon, LoHa, LoKr, full) times its ratio is summed per module, then factored into a LoRA of ``--new_rank``
(3x3 convs: ``--new_conv_rank``) with alpha = rank. Exact when the new rank reaches the summed ΔW's rank (with
``--clamp_quantile 1``); otherwise the best approximation of that rank.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.lora_family import write_lora_file
from library.lora_tools.merge import (
    CLAMP_QUANTILE,
    MERGE_PRECISIONS,
    load_loras,
    lora_modelspec,
    minimum_network_metadata,
    model_shapes,
    parse_lbws,
    precision_dtype,
    summed_deltas,
    svd_lora,
)

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class SvdMergeSettings:
    """svd_merge_lora.py's flags (sd-scripts' names and defaults, plus --clamp_quantile and --sd_model)."""

    save_precision: str | None = None
    precision: str = "float"
    save_to: str | None = None
    models: list[str] | None = None
    ratios: list[float] | None = None
    lbws: list[str] | None = None
    new_rank: int = 4
    new_conv_rank: int | None = None
    device: str | None = None
    no_metadata: bool = False
    clamp_quantile: float = CLAMP_QUANTILE
    sd_model: str | None = None


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    precisions = list(MERGE_PRECISIONS)
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=precisions,
        help="saving precision (default: --precision)",
    )
    parser.add_argument(
        "--precision", type=str, default="float", choices=precisions, help="precision of the merge (float recommended)"
    )
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file: .safetensors or .ckpt/.pt")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA-family files to merge (.safetensors or .ckpt/.pt)")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio for each model")
    parser.add_argument(
        "--lbws", type=str, nargs="*", help="block weights per model: JSON lists of 12/17/20/26 numbers"
    )
    parser.add_argument("--new_rank", type=int, default=4, help="rank (dim) of the output LoRA")
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank for 3x3 conv modules (default: --new_rank)"
    )
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--no_metadata", action="store_true", help="write no modelspec metadata (the minimum ss_* keys are kept)"
    )
    parser.add_argument(
        "--clamp_quantile",
        type=float,
        default=CLAMP_QUANTILE,
        help="clamp the new factors at this quantile of their values (sd-scripts: 0.99; 1 = no clamp, exact)",
    )
    parser.add_argument(
        "--sd_model",
        type=str,
        default=None,
        help="optional model whose layer shapes are used and checked (for LoHa/LoKr files of unknown base)",
    )
    return parser


def main(argv: Sequence[str]) -> None:
    s = settings_from_flags(SvdMergeSettings, setup_parser().parse_args(argv))
    if not s.save_to:
        raise UserError("--save_to: say where to write the merged LoRA")
    if s.new_rank < 1 or (s.new_conv_rank is not None and s.new_conv_rank < 1):
        raise UserError("--new_rank/--new_conv_rank: give a rank of at least 1")
    if not 0 < s.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {s.clamp_quantile}: give a fraction in (0, 1]")
    dtype = precision_dtype(s.precision)
    save_precision = s.save_precision or s.precision
    new_conv_rank = s.new_conv_rank if s.new_conv_rank is not None else s.new_rank
    loras = load_loras(s.models, s.ratios)
    block_weights = parse_lbws(s.lbws, len(loras))
    shapes = None
    if s.sd_model is not None:
        from library.models.load import load_model

        shapes = model_shapes(load_model(s.sd_model), loras)
    logger.info(f"new rank: {s.new_rank}, new conv rank: {new_conv_rank}")
    sums = summed_deltas(loras, dtype, s.device or "cpu", shapes, block_weights)
    tensors = svd_lora(sums, s.new_rank, new_conv_rank, s.clamp_quantile)
    network_args = {"conv_dim": new_conv_rank, "conv_alpha": new_conv_rank}
    metadata = minimum_network_metadata(loras, str(s.new_rank), str(s.new_rank), network_args)
    if not s.no_metadata:
        metadata.update(lora_modelspec(tensors, metadata, loras, s.save_to))
    write_lora_file(s.save_to, tensors, metadata, precision=MERGE_PRECISIONS[save_precision])
    print(
        f"svd-merged {len(loras)} file(s) into {len(sums)} LoRA module(s), rank {s.new_rank} "
        f"(conv {new_conv_rank}); wrote {s.save_to} ({save_precision})"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
