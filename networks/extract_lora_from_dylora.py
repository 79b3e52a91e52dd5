"""Cut a DyLoRA file into smaller-rank LoRA files, as sd-scripts' networks/extract_lora_from_dylora.py: one file per
rank ``unit, 2·unit, …`` below the trained rank, named ``<save_to>-NNNN.<ext>`` (e.g. ``out-0004.safetensors``),
each module keeping its first ranks and its alpha. DyLoRA trains every leading slice to work on its own.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.io import atomic_save, load_safetensors, save_safetensors
from library.metadata import precalculate_safetensors_hashes
from networks.dylora import split_dylora
from networks.lora import load_lora_state_dict

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class ExtractDyLoRASettings:
    """The flags: ``--model`` (the DyLoRA file), ``--save_to`` (base name of the outputs), ``--unit``."""

    model: str | None = None
    save_to: str | None = None
    unit: int | None = None


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--unit", type=int, default=None, help="rank step to split at (default: the file's unit)")
    parser.add_argument("--save_to", type=str, default=None, help="base file name of the outputs (.safetensors/.ckpt)")
    parser.add_argument("--model", type=str, default=None, help="DyLoRA file to split (.safetensors or .ckpt/.pt)")
    return parser


def file_unit(metadata: dict[str, str]) -> int | None:
    """The ``unit`` a DyLoRA file was trained with, from its ``ss_network_args`` metadata (None when absent)."""
    try:
        value = json.loads(metadata.get("ss_network_args") or "{}").get("unit")
        return int(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def main(argv: Sequence[str]) -> None:
    s = settings_from_flags(ExtractDyLoRASettings, setup_parser().parse_args(argv))
    if not s.model or not s.save_to:
        raise UserError("--model and --save_to are required: the DyLoRA file and the base name of the outputs")
    if not Path(s.model).is_file():
        raise UserError(f"--model {s.model}: no such file")
    is_safetensors = Path(s.model).suffix.lower() == ".safetensors"
    sd, metadata = load_safetensors(s.model) if is_safetensors else (load_lora_state_dict(s.model), {})
    ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")})
    if not ranks:
        raise UserError(f"--model {s.model}: no lora_down weights; is it a DyLoRA/LoRA file?")
    unit = s.unit or file_unit(metadata)
    if not unit or unit < 1:
        raise UserError(f"--model {s.model}: the file does not record its unit; give --unit (e.g. --unit 4)")
    if unit >= ranks[-1]:
        raise UserError(f"--unit {unit}: the file's rank is {ranks[-1]}, so there is no smaller rank to extract")
    logger.info(f"max rank {ranks[-1]}, unit {unit}")
    base, ext = str(Path(s.save_to).with_suffix("")), Path(s.save_to).suffix
    comment = metadata.get("ss_training_comment", "")
    written = []
    for rank, tensors in tqdm(list(split_dylora(sd, unit)), desc="ranks", unit="file"):
        path = f"{base}-{rank:04d}{ext}"
        if ext.lower() == ".safetensors":
            meta = dict(metadata)
            meta["ss_training_comment"] = f"split from DyLoRA, rank {ranks[-1]} to {rank}; {comment}"
            meta["ss_network_dim"] = str(rank)
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
            save_safetensors(tensors, path, meta)
        else:
            atomic_save(path, lambda tmp, t=tensors: torch.save(t, tmp))
        written.append(path)
    logger.info(f"wrote {len(written)} files, ranks {unit} to {unit * len(written)}: {written[0]} … {written[-1]}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
