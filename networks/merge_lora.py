"""Merge LoRA-family files, as sd-scripts' networks/merge_lora.py: into a model's weights with ``--sd_model`` (LoRA,
LoCon, LoHa, LoKr, full, DoRA, OFT), or, without it, several LoRA/LoCon files into one LoRA (sd-scripts' weighted
sum of same-rank files, or ``--concat``: ranks stacked so the result is exactly the sum of the files' ΔW).
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
    MERGE_PRECISIONS,
    load_loras,
    lora_modelspec,
    merge_into_model,
    merge_lora_files,
    model_metadata,
    model_save_format,
    precision_dtype,
)

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class MergeLoraSettings:
    """merge_lora.py's flags (sd-scripts' names and defaults)."""

    v2: bool = False
    save_precision: str | None = None
    precision: str = "float"
    sd_model: str | None = None
    save_to: str | None = None
    models: list[str] | None = None
    ratios: list[float] | None = None
    no_metadata: bool = False
    concat: bool = False
    shuffle: bool = False


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    precisions = list(MERGE_PRECISIONS)
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (checked: the weights decide)")
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
    parser.add_argument(
        "--sd_model",
        type=str,
        default=None,
        help="model to merge into (.ckpt/.safetensors file, diffusers folder or tiny-sd1); omitted: merge LoRA files",
    )
    parser.add_argument(
        "--save_to", type=str, default=None, help="output: .safetensors or .ckpt file (a folder: diffusers model)"
    )
    parser.add_argument("--models", type=str, nargs="*", help="LoRA-family files to merge (.safetensors or .ckpt/.pt)")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio for each model")
    parser.add_argument(
        "--no_metadata", action="store_true", help="write no modelspec metadata (a LoRA keeps its minimum ss_* keys)"
    )
    parser.add_argument(
        "--concat", action="store_true", help="concatenate LoRAs (output rank = sum of input ranks; exact sum of ΔW)"
    )
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rank axis of the merged LoRA's weights")
    return parser


def main(argv: Sequence[str]) -> None:
    s = settings_from_flags(MergeLoraSettings, setup_parser().parse_args(argv))
    if not s.save_to:
        raise UserError("--save_to: say where to write the merged file")
    dtype = precision_dtype(s.precision)
    save_precision = s.save_precision or s.precision
    loras = load_loras(s.models, s.ratios)
    if s.sd_model is not None:
        from library.models.load import load_model
        from library.models.save import save_model

        save_as = model_save_format(s.save_to)
        logger.info(f"loading SD model: {s.sd_model}")
        components = load_model(s.sd_model, v2=True if s.v2 else None, dtype=dtype)
        merged = merge_into_model(components, loras)
        metadata = None if s.no_metadata else model_metadata(components, s.save_to, s.sd_model, loras)
        path = save_model(components, s.save_to, save_as, save_precision, metadata)
        print(
            f"merged {merged} module(s) from {len(loras)} file(s) into {s.sd_model}; "
            f"wrote {path} ({save_as}, {save_precision})"
        )
        return
    tensors, metadata = merge_lora_files(loras, dtype, concat=s.concat, shuffle=s.shuffle)
    if not s.no_metadata:
        metadata.update(lora_modelspec(tensors, metadata, loras, s.save_to))
    write_lora_file(s.save_to, tensors, metadata, precision=MERGE_PRECISIONS[save_precision])
    modules = sum(1 for k in tensors if k.endswith(".lora_down.weight"))
    how = "concatenated" if s.concat else "summed"
    print(
        f"{how} {len(loras)} LoRA file(s) into {modules} module(s), dim {metadata['ss_network_dim']}, alpha "
        f"{metadata['ss_network_alpha']}; wrote {s.save_to} ({save_precision})"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
