"""What sd-scripts' networks/resize_lora.py computes: each LoRA/LoCon module's ΔW re-factored by SVD to a new rank
(fixed, or chosen per module by ``sv_ratio``/``sv_fro``/``sv_cumulative``), with alpha rescaled so the module's
scale (alpha / rank) is unchanged, and the ``ss_*`` metadata updated as sd-scripts does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_family import (
    ModuleWeights,
    lora_from_delta,
    parse_modules,
    rank_stats,
    read_lora_file,
    svd_rank_for,
    write_lora_file,
)
from library.lora_family.weights import DYNAMIC_METHODS, lora_delta

logger = logging.getLogger("sdtrain")

SAVE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ResizeSettings:
    """resize_lora.py's flags (sd-scripts' names and defaults)."""

    model: str | None = None
    save_to: str | None = None
    new_rank: int = 4
    new_conv_rank: int | None = None
    save_precision: str | None = None
    device: str | None = None
    verbose: bool = False
    dynamic_method: str | None = None
    dynamic_param: float | None = None


@dataclass(frozen=True)
class ResizedModule:
    """One module's outcome: its old and new rank, new alpha and the figures ``--verbose`` prints."""

    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float


def check_settings(s: ResizeSettings) -> None:
    """sd-scripts' checks (and a few it lacks) as one-line UserErrors."""
    if not s.model:
        raise UserError("--model: give the LoRA file to resize")
    if not s.save_to or not s.save_to.endswith(SAVE_SUFFIXES):
        raise UserError(f"--save_to {s.save_to}: give a {', '.join(SAVE_SUFFIXES)} file to write")
    if s.new_rank < 1 or (s.new_conv_rank is not None and s.new_conv_rank < 1):
        raise UserError(f"--new_rank {s.new_rank} / --new_conv_rank {s.new_conv_rank}: ranks must be at least 1")
    if s.dynamic_method is not None and s.dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {s.dynamic_method}: use one of {', '.join(DYNAMIC_METHODS)}")
    if s.dynamic_method and not s.dynamic_param:
        raise UserError(f"--dynamic_method {s.dynamic_method} needs --dynamic_param (a positive number)")
    if s.dynamic_param is not None and s.dynamic_param < 0:
        raise UserError(f"--dynamic_param {s.dynamic_param}: give a positive number")


def resizable_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleWeights]:
    """The file's modules, all LoRA/LoCon without DoRA; anything else is a one-line UserError (sd-scripts resizes
    LoRA pairs only, and a DoRA magnitude cannot be kept right without the base model)."""
    modules = parse_modules(tensors, source)
    for module in modules.values():
        if module.algo != "lora":
            raise UserError(
                f"{source}: module {module.name} is {module.kind}; resize_lora.py resizes LoRA/LoCon files only"
            )
        if module.dora:
            raise UserError(
                f"{source}: module {module.name} is DoRA (dora_scale); its magnitude depends on the base model, "
                "so it cannot be resized"
            )
    return modules


def resize_module(
    module: ModuleWeights, max_rank: int, method: str | None, param: float | None, device: str | None = None
) -> tuple[dict[str, torch.Tensor], ResizedModule]:
    """The module's tensors at its new rank and what was kept; alpha becomes ``alpha / old rank * new rank``
    (sd-scripts' rule; no alpha counts as scale 1), so the scaled ΔW keeps its size. A Tucker ``lora_mid``
    is folded in: the result is a plain LoCon pair."""
    old_rank = module.rank
    tensors = {k: v.to(device or "cpu", torch.float32) for k, v in module.tensors.items()}
    delta = lora_delta(tensors)
    singular = torch.linalg.svdvals(delta.flatten(1))
    rank = min(svd_rank_for(singular, method, param, max_rank), len(singular))
    up, down, _ = lora_from_delta(delta, rank)
    scale = torch.tensor(module.alpha if module.alpha else old_rank, dtype=torch.float32) / old_rank
    new_alpha = float(scale * rank)
    total, fro, ratio = rank_stats(singular.cpu(), rank)
    out = {
        f"{module.name}.lora_down.weight": down.cpu(),
        f"{module.name}.lora_up.weight": up.cpu(),
        f"{module.name}.alpha": torch.tensor(new_alpha),
    }
    return out, ResizedModule(module.name, old_rank, rank, new_alpha, total, fro, ratio)


def verbose_line(r: ResizedModule, dynamic: bool) -> str:
    """sd-scripts' ``--verbose`` line for a module."""
    line = (
        f"{r.name:75} | sum(S) retained: {r.sum_retained:.1%}, fro retained: {r.fro_retained:.1%}, "
        f"max(S) ratio: {r.max_ratio:0.1f}"
    )
    return line + (f", dynamic | dim: {r.new_rank}, alpha: {r.new_alpha}" if dynamic else "")


def fro_mean_std(results: list[ResizedModule]) -> tuple[float, float]:
    """Mean and (population) std of the Frobenius fractions kept, NaNs (zero modules) left out as sd-scripts."""
    fro = [r.fro_retained for r in results if not math.isnan(r.fro_retained)]
    if not fro:
        return math.nan, math.nan
    mean = sum(fro) / len(fro)
    return mean, math.sqrt(sum((f - mean) ** 2 for f in fro) / len(fro))


def average_line(results: list[ResizedModule]) -> str:
    """sd-scripts' closing ``--verbose`` line."""
    mean, std = fro_mean_std(results)
    return f"Average Frobenius norm retention: {mean:.2%} | std: {std:0.3f}"


def resized_metadata(metadata: dict[str, str], s: ResizeSettings, old_dim: int, new_alpha: float) -> dict[str, str]:
    """sd-scripts' metadata update: a ``ss_training_comment`` prefix and the new ``ss_network_dim``/``alpha``
    (``Dynamic`` for dynamic methods); the ``sshs_*`` hashes are recomputed on writing."""
    meta = dict(metadata)
    comment = meta.get("ss_training_comment", "")
    conv_rank = s.new_conv_rank if s.new_conv_rank is not None else s.new_rank
    if not s.dynamic_method:
        conv_desc = "" if s.new_rank == conv_rank else f" (conv: {conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {s.new_rank}{conv_desc}; {comment}"
        meta["ss_network_dim"] = str(s.new_rank)
        meta["ss_network_alpha"] = str(new_alpha)
    else:
        meta["ss_training_comment"] = (
            f"Dynamic resize with {s.dynamic_method}: {s.dynamic_param} from {old_dim}; {comment}"
        )
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    return meta


def resize_lora(s: ResizeSettings) -> list[ResizedModule]:
    """Read ``s.model``, resize every module and write ``s.save_to`` (float unless ``--save_precision``)."""
    check_settings(s)
    lora = read_lora_file(s.model)
    modules = resizable_modules(lora.tensors, s.model)
    conv_rank = s.new_conv_rank if s.new_conv_rank is not None else s.new_rank
    if s.dynamic_method:
        logger.info(
            f"Dynamically determining new alphas and dims based off {s.dynamic_method}: {s.dynamic_param}, "
            f"max rank is {s.new_rank}"
        )
    tensors: dict[str, torch.Tensor] = {}
    results: list[ResizedModule] = []
    with torch.no_grad():
        for module in tqdm(modules.values(), desc="resizing", unit="module", dynamic_ncols=True):
            conv = module.tensors["lora_down.weight"].dim() == 4
            out, result = resize_module(
                module, conv_rank if conv else s.new_rank, s.dynamic_method, s.dynamic_param, s.device
            )
            tensors.update(out)
            results.append(result)
    if s.verbose:
        print("\n" + "".join(verbose_line(r, bool(s.dynamic_method)) + "\n" for r in results))
        print(average_line(results))
    old_dim = max(r.old_rank for r in results)
    metadata = resized_metadata(lora.metadata, s, old_dim, results[-1].new_alpha)
    Path(s.save_to).parent.mkdir(parents=True, exist_ok=True)
    write_lora_file(s.save_to, tensors, metadata, s.save_precision or "float")
    ranks = sorted({r.new_rank for r in results})
    logger.info(
        f"resized {len(results)} modules from rank {old_dim} to {'/'.join(map(str, ranks))} "
        f"(mean Frobenius norm kept {fro_mean_std(results)[0]:.2%}); saved to {s.save_to}"
    )
    return results
