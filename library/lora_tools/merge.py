"""What sd-scripts' networks/merge_lora.py and svd_merge_lora.py compute: LoRA-family files merged into a model's
weights, several LoRA files merged into one (sd-scripts' weighted sum, or an exact rank concatenation), and the
summed ΔW of any LoRA-family files re-factored by SVD into one LoRA of a chosen rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_family import (
    LoraFile,
    ModuleWeights,
    check_modules,
    delta_weight,
    detect_base,
    layer_name,
    lora_from_delta,
    merged_bias,
    merged_weight,
    model_layers,
    parse_modules,
    read_lora_file,
)
from library.models.family import family_named
from library.modelspec import build_modelspec

logger = logging.getLogger("sdtrain")

MERGE_PRECISIONS: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""sd-scripts' ``--precision`` / ``--save_precision`` names."""
CLAMP_QUANTILE = 0.99
"""svd_merge_lora.py's fixed clamp of the new factors' values (here the default of ``--clamp_quantile``)."""
MODELSPEC_TITLE = "modelspec.title"


@dataclass(frozen=True)
class LoadedLora:
    """One input file: what was read, its parsed modules and the ratio it is merged with."""

    file: LoraFile
    modules: dict[str, ModuleWeights]
    ratio: float

    @property
    def path(self) -> str:
        """The file's path as given."""
        return self.file.path


def precision_dtype(name: str, flag: str = "--precision") -> torch.dtype:
    """The dtype of an sd-scripts precision name (``float``, ``fp16``, ``bf16``); a UserError otherwise."""
    try:
        return MERGE_PRECISIONS[name]
    except KeyError:
        raise UserError(f"{flag} {name!r}: use one of {', '.join(MERGE_PRECISIONS)}") from None


def load_loras(models: Sequence[str] | None, ratios: Sequence[float] | None) -> list[LoadedLora]:
    """Read and parse every ``--models`` file with its ``--ratios`` entry (counts must agree, as sd-scripts asserts)."""
    if not models:
        raise UserError("--models: give at least one LoRA file to merge")
    if ratios is None or len(ratios) != len(models):
        given = 0 if ratios is None else len(ratios)
        raise UserError(f"--ratios: {given} ratio(s) for {len(models)} model(s); give one ratio per --models file")
    loaded = []
    for path, ratio in zip(models, ratios):
        logger.info(f"loading: {path}")
        file = read_lora_file(path)
        loaded.append(LoadedLora(file, parse_modules(file.tensors, str(path)), float(ratio)))
    return loaded


def title_of(path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """sd-scripts' merged-from title of a file: its ``modelspec.title``, else its file name without suffix."""
    meta = dict(metadata or {})
    if not meta and Path(path).suffix.lower() == ".safetensors" and Path(path).is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    return meta.get(MODELSPEC_TITLE) or Path(path).stem


def merged_from(sources: Sequence[str | os.PathLike], loras: Sequence[LoadedLora] = ()) -> str:
    """``modelspec.merged_from``: the comma-joined titles of the model (if any) and the LoRA files."""
    return ", ".join([title_of(s) for s in sources] + [title_of(lo.path, lo.file.metadata) for lo in loras])


# ---- LoRA-family files into a model ----


def merge_into_model(components, loras: Sequence[LoadedLora]) -> int:
    """Merge every file into the model's layers in place (``W ← merged_weight(W, module, ratio)``: plain ΔW, DoRA's
    decomposition, OFT's rotation; ``diff_b`` into the bias). Every file is checked against the model first.
    Returns the number of modules merged."""
    checked = [check_modules(lo.modules, components, lo.path, lo.file.metadata) for lo in loras]
    for lo, layers in zip(loras, checked):
        for name, module in lo.modules.items():
            if "diff_b" in module.tensors and layers[name].bias is None:
                raise UserError(f"{lo.path}: module {name} has a bias difference (diff_b) but its layer has no bias")
    total = sum(len(lo.modules) for lo in loras)
    done = 0
    with torch.no_grad(), tqdm(total=total, desc="merging", unit="module", dynamic_ncols=True) as bar:
        for lo, layers in zip(loras, checked):
            for name, module in lo.modules.items():
                layer = layers[name]
                layer.weight.copy_(merged_weight(layer.weight, module, lo.ratio).to(layer.weight.dtype))
                if "diff_b" in module.tensors:
                    layer.bias.copy_(merged_bias(layer.bias, module, lo.ratio).to(layer.bias.dtype))
                done += 1
                bar.update()
    return done


def model_save_format(save_to: str) -> str:
    """save_model's format for ``--save_to``: ``.safetensors`` or ``.ckpt``/``.pt`` single file, or a diffusers
    folder (safetensors weights) for a path without suffix."""
    suffix = Path(save_to).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth"):
        return "ckpt"
    if suffix == "":
        return "diffusers_safetensors"
    raise UserError(f"--save_to {save_to}: use a .safetensors or .ckpt file, or a folder name for a diffusers model")


def model_metadata(components, save_to: str, sd_model: str, loras: Sequence[LoadedLora]) -> dict[str, str]:
    """``modelspec.*`` of a merged checkpoint as sd-scripts writes it (title = the file name, merged_from = the
    model's and the LoRAs' titles), with the architecture and prediction type of the loaded model."""
    return build_modelspec(
        components.family,
        components.v_parameterization,
        lora=False,
        textual_inversion=False,
        timestamp=time.time(),
        title=Path(save_to).stem,
        merged_from=merged_from([sd_model], loras),
        is_stable_diffusion_ckpt=True,
    )


# ---- LoRA files into one LoRA ----


def _only_lora(lo: LoadedLora) -> None:
    for name, module in lo.modules.items():
        if module.dora:
            raise UserError(
                f"{lo.path}: module {name} is {module.kind}; a DoRA module cannot be merged into a LoRA file "
                "(its magnitude depends on the model's weights); merge it into a model with --sd_model"
            )
        if module.algo != "lora":
            raise UserError(
                f"{lo.path}: module {name} is {module.kind}; merge_lora.py merges only LoRA/LoCon files into a LoRA; "
                "use svd_merge_lora.py (it sums any type's ΔW and re-factors it) or merge into a model with --sd_model"
            )


def _effective_alpha(module: ModuleWeights) -> float:
    """Alpha as the scale uses it: a missing or zero alpha means alpha = rank (scale 1)."""
    return float(module.alpha) if module.alpha else float(module.rank)


def _weighted_sum(loras: Sequence[LoadedLora], dtype: torch.dtype) -> tuple[dict, dict[str, float]]:
    """sd-scripts' rule: every factor times sqrt(alpha / first alpha) · ratio (up: its absolute value), summed."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    base_alpha: dict[str, float] = {}
    for lo in loras:
        for name, module in lo.modules.items():
            alpha = _effective_alpha(module)
            base = base_alpha.setdefault(name, alpha)
            scale = math.sqrt(alpha / base) * lo.ratio
            into = merged.get(name)
            if into is not None and (
                set(into) != set(module.tensors) or any(into[k].shape != t.shape for k, t in module.tensors.items())
            ):
                ranks = f"rank {next(iter(into.values())).shape[0]} vs {module.rank}"
                raise UserError(
                    f"{lo.path}: module {name} does not match the earlier files' ({ranks}, or another layout); "
                    "only same-rank LoRAs can be summed: use --concat or svd_merge_lora.py"
                )
            into = merged.setdefault(name, {})
            for key, t in module.tensors.items():
                part = t.to(dtype) * (abs(scale) if key == "lora_up.weight" else scale)
                into[key] = part if key not in into else into[key] + part
    return merged, base_alpha


def _concatenated(loras: Sequence[LoadedLora], dtype: torch.dtype) -> tuple[dict, dict[str, float]]:
    """Ranks stacked so that the merged module's ΔW is exactly Σ ratio·ΔW: the first file's alpha is kept and each
    file's factors carry sqrt(|ratio · its scale / merged scale|) (the sign on down); Tucker cores go block-diagonal."""
    parts: dict[str, list[tuple[LoadedLora, ModuleWeights]]] = {}
    for lo in loras:
        for name, module in lo.modules.items():
            parts.setdefault(name, []).append((lo, module))
    merged: dict[str, dict[str, torch.Tensor]] = {}
    base_alpha: dict[str, float] = {}
    for name, items in parts.items():
        tucker = {m.tucker for _, m in items}
        shapes = {tuple(m.delta_shape()) for _, m in items}
        if len(tucker) > 1 or len(shapes) > 1:
            raise UserError(
                f"{items[-1][0].path}: module {name} has another shape or layout than in {items[0][0].path} "
                f"(ΔW {' vs '.join(str(s) for s in sorted(shapes))}); are the files for the same model?"
            )
        rank = sum(m.rank for _, m in items)
        alpha = _effective_alpha(items[0][1])
        out_scale = alpha / rank
        ups, downs, mids = [], [], []
        for lo, m in items:
            factor = lo.ratio * m.scale / out_scale
            g = math.sqrt(abs(factor))
            ups.append(m.tensors["lora_up.weight"].to(dtype) * g)
            downs.append(m.tensors["lora_down.weight"].to(dtype) * (g if factor >= 0 else -g))
            if m.tucker:
                mids.append(m.tensors["lora_mid.weight"].to(dtype))
        out = {"lora_up.weight": torch.cat(ups, 1), "lora_down.weight": torch.cat(downs, 0)}
        if mids:
            mid = torch.zeros(rank, rank, *mids[0].shape[2:], dtype=dtype)
            at = 0
            for block in mids:
                n = block.shape[0]
                mid[at : at + n, at : at + n] = block
                at += n
            out["lora_mid.weight"] = mid
        merged[name], base_alpha[name] = out, alpha
    return merged, base_alpha


def _shuffled(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts' --shuffle: the rank axis permuted at random (ΔW unchanged)."""
    perm = torch.randperm(tensors["lora_down.weight"].shape[0])
    out = {"lora_down.weight": tensors["lora_down.weight"][perm], "lora_up.weight": tensors["lora_up.weight"][:, perm]}
    if "lora_mid.weight" in tensors:
        out["lora_mid.weight"] = tensors["lora_mid.weight"][perm][:, perm]
    return out


def _network_value(values: Sequence[float | int]) -> str:
    distinct = set(values)
    return str(next(iter(distinct))) if len(distinct) == 1 else "Dynamic"


def _alpha_text(alpha: float, rank: int, module: ModuleWeights) -> float | int:
    """sd-scripts prints a file's alpha as a float and the rank it stands in for as an int."""
    return alpha if module.alpha else rank


def merge_lora_files(
    loras: Sequence[LoadedLora], dtype: torch.dtype, concat: bool = False, shuffle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Several LoRA/LoCon files as one: (state dict, sd-scripts' minimum ``ss_*`` metadata). Without ``concat``
    sd-scripts' weighted sum of same-rank factors (approximate: cross terms); with it an exact concatenation."""
    for lo in loras:
        _only_lora(lo)
    merged, alphas = (_concatenated if concat else _weighted_sum)(loras, dtype)
    first = {name: m for lo in reversed(loras) for name, m in lo.modules.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in merged.items():
        parts = _shuffled(parts) if shuffle else parts
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in parts.items()})
        tensors[f"{name}.alpha"] = torch.tensor(alphas[name], dtype=dtype)
    ranks = {name: parts["lora_down.weight"].shape[0] for name, parts in merged.items()}
    metadata = minimum_network_metadata(
        loras,
        _network_value(list(ranks.values())),
        _network_value([_alpha_text(alphas[n], first[n].rank, first[n]) for n in merged]),
        None,
    )
    return tensors, metadata


def minimum_network_metadata(
    loras: Sequence[LoadedLora], dim: str, alpha: str, network_args: dict | None
) -> dict[str, str]:
    """sd-scripts' build_minimum_network_metadata for a merged LoRA: module networks.lora, dim, alpha, args, and
    ``ss_v2`` / ``ss_base_model_version`` taken from the first file that has them."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((lo.file.metadata[key] for lo in loras if key in lo.file.metadata), None)
        if value is not None:
            metadata[key] = value
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def lora_modelspec(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], loras: Sequence[LoadedLora], save_to: str
) -> dict[str, str]:
    """``modelspec.*`` of a merged LoRA (title = file name, merged_from = the inputs' titles). The family comes from
    the merged keys and metadata (SD 1.x when nothing tells); v-prediction from the inputs' metadata, else, as
    sd-scripts, assumed for an SD 2.x file (with its warning)."""
    guess = detect_base(parse_modules(tensors), metadata)
    family = family_named(guess.family or "sd1")
    said = [
        lo.file.metadata.get("ss_v_parameterization") == "True"
        or lo.file.metadata.get("modelspec.prediction_type") == "v"
        for lo in loras
        if "ss_v_parameterization" in lo.file.metadata or "modelspec.prediction_type" in lo.file.metadata
    ]
    v_pred = any(said) if said else family.v2
    if family.v2 and not said:
        logger.warning("cannot tell whether the LoRA is for v-prediction; its metadata says v-prediction (sd-scripts)")
    return build_modelspec(
        family,
        v_pred,
        lora=True,
        textual_inversion=False,
        timestamp=time.time(),
        title=Path(save_to).stem,
        merged_from=merged_from([], loras),
    )


# ---- any LoRA-family files into one LoRA by SVD ----

_CONV3_ENDS = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out", "_op", "_in_layers_2", "_out_layers_3")
_CONV3_NAMES = ("lora_unet_input_blocks_0_0", "lora_unet_out_2")


def _kernel_from_name(name: str, family: str | None, path: str) -> tuple[int, int] | None:
    """The conv kernel of the SD/SDXL UNet layer a module name refers to (None: a Linear), for files that store
    conv kernels flattened (LoHa/LoKr without Tucker)."""
    if not name.startswith("lora_unet_"):
        return None
    if name.endswith(("_conv_shortcut", "_skip_connection")):
        return (1, 1)
    if name.endswith(_CONV3_ENDS) or name in _CONV3_NAMES:
        return (3, 3)
    if name.endswith(("_proj_in", "_proj_out")):
        if family is None:
            raise UserError(
                f"{path}: module {name} stores its weight flattened and the base model is unknown (SD 1.x: 1x1 conv, "
                "SD 2.x/SDXL: linear); pass --sd_model"
            )
        return (1, 1) if family == "sd1" else None
    return None


def layer_shape(
    module: ModuleWeights, path: str, family: str | None, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[int, ...]:
    """The weight shape of the layer a module modifies: the model's (``shapes`` from --sd_model), else the shape
    the file holds, with a flattened LoHa/LoKr conv kernel restored from the layer's name."""
    if shapes is not None and layer_name(module.name) in shapes:
        return shapes[layer_name(module.name)]
    delta = tuple(module.delta_shape())
    if len(delta) != 2 or module.algo in ("lora", "full"):
        return delta
    kernel = _kernel_from_name(module.name, family, path)
    if kernel is None:
        return delta
    size = kernel[0] * kernel[1]
    if delta[1] % size:
        raise UserError(f"{path}: module {module.name} ΔW {delta} cannot hold a {kernel} kernel; pass --sd_model")
    return (delta[0], delta[1] // size, *kernel)


def model_shapes(components, loras: Sequence[LoadedLora]) -> dict[str, tuple[int, ...]]:
    """The layer weight shapes of a model, after checking every file's modules against it (one line on a mismatch)."""
    for lo in loras:
        check_modules(lo.modules, components, lo.path, lo.file.metadata)
    return {name: tuple(layer.weight.shape) for name, layer in model_layers(components, True).items()}


def summed_deltas(
    loras: Sequence[LoadedLora],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    block_weights: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ ratio·ΔW per module over every file (any algorithm through delta_weight), in the layer's weight shape,
    times the file's ``--lbws`` block weight. DoRA and OFT modules need the model's weights and are refused;
    ``diff_b`` is left out with a warning."""
    sums: dict[str, torch.Tensor] = {}
    biases = 0
    for i, lo in enumerate(loras):
        family = detect_base(lo.modules, lo.file.metadata).family
        weights = block_weights[i] if block_weights else None
        for name, module in tqdm(lo.modules.items(), desc=f"summing {Path(lo.path).name}", unit="module"):
            if module.dora or module.algo == "oft":
                raise UserError(
                    f"{lo.path}: module {name} is {module.kind}, whose ΔW depends on the model's weights; "
                    "svd_merge_lora.py cannot merge it: merge it into a model with merge_lora.py --sd_model"
                )
            shape = layer_shape(module, lo.path, family, shapes)
            ratio = lo.ratio
            if weights is not None and (block := lbw_block_index(name, family == "sdxl")) >= 0:
                ratio *= weights[block]
            delta = delta_weight(module, shape=shape).to(device, dtype) * ratio
            biases += "diff_b" in module.tensors
            if name in sums and sums[name].shape != delta.shape:
                raise UserError(
                    f"{lo.path}: module {name} ΔW {tuple(delta.shape)} does not match the earlier files' "
                    f"{tuple(sums[name].shape)}; are the files for the same model?"
                )
            sums[name] = delta if name not in sums else sums[name] + delta
    if biases:
        logger.warning(f"{biases} module(s) carry a bias difference (diff_b), which a LoRA cannot hold: left out")
    return sums


def svd_lora(
    sums: Mapping[str, torch.Tensor], new_rank: int, new_conv_rank: int, clamp_quantile: float | None
) -> dict[str, torch.Tensor]:
    """svd_merge_lora.py's extraction: each summed ΔW re-factored into a LoRA of ``new_rank`` (kxk convs:
    ``new_conv_rank``), capped at min(in, out) channels, factors clamped at ``clamp_quantile``, alpha = rank."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mat in tqdm(sums.items(), desc="extracting", unit="module", dynamic_ncols=True):
            conv3 = mat.dim() == 4 and tuple(mat.shape[2:]) != (1, 1)
            rank = min(new_conv_rank if conv3 else new_rank, mat.shape[0], mat.shape[1])
            quantile = None if clamp_quantile is None or clamp_quantile >= 1 else clamp_quantile
            up, down, _ = lora_from_delta(mat.float(), rank, clamp_quantile=quantile)
            tensors[f"{name}.lora_up.weight"] = up.cpu().contiguous()
            tensors[f"{name}.lora_down.weight"] = down.cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))
    return tensors


# ---- svd_merge_lora.py's --lbws (layer-block weights, A1111 LoRA Block Weight's 12/17/20/26 layouts) ----

LBW_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
"""The 26 block slots: BASE (the text encoder), IN00-IN11, MID, OUT00-OUT11."""
LBW_LAYOUTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))),
    26: LBW_BLOCKS,
}
"""Which slots an lbw list of each length sets (sd-scripts' LAYER12/17/20/26)."""
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def parse_lbws(lbws: Sequence[str] | None, count: int) -> list[list[float]] | None:
    """Each ``--lbws`` entry (a JSON list of 12, 17, 20 or 26 numbers) as 26 slot weights (unset slots: 1)."""
    if not lbws:
        return None
    if len(lbws) != count:
        raise UserError(f"--lbws: {len(lbws)} list(s) for {count} model(s); give one per --models file")
    out: list[list[float]] = []
    length = 0
    for text in lbws:
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise UserError(f"--lbws {text!r}: give a JSON list of numbers, e.g. '[1,0,1,1,1,1,1,1,1,1,1,1]'")
        if len(values) not in LBW_LAYOUTS:
            raise UserError(f"--lbws {text!r}: {len(values)} values; give {', '.join(map(str, LBW_LAYOUTS))}")
        if out and len(values) != length:
            raise UserError(f"--lbws {text!r}: {len(values)} values after {length}; give every list the same length")
        length = len(values)
        weights = [1.0] * len(LBW_BLOCKS)
        for slot, value in zip(LBW_LAYOUTS[len(values)], values):
            weights[LBW_BLOCKS.index(slot)] = float(value)
        out.append(weights)
    return out


def lbw_block_index(name: str, sdxl: bool) -> int:
    """The slot (0 = BASE ... 25 = OUT11) of a module name, as sd-scripts' get_lbw_block_index; -1: none."""
    if "text_model_encoder_" in name:
        return 0
    if sdxl:
        rest = name.removeprefix("lora_unet_")
        if rest.startswith(("time_embed_", "label_emb_")):
            return 1
        if rest.startswith("input_blocks_"):
            return 1 + int(rest.split("_")[2])
        if rest.startswith("middle_block_"):
            return 13
        if rest.startswith("output_blocks_"):
            return 14 + int(rest.split("_")[2])
        return 23 if rest.startswith("out_") else -1
    m = _UPDOWN.search(name)
    if m is None:
        return 13 if "mid_block_" in name else -1
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    if side == "down":
        if kind == "upsamplers":
            return -1
        return 1 + (3 * (i + 1) if kind == "downsamplers" else 3 * i + j + 1)
    if kind == "downsamplers":
        return -1
    return 14 + (3 * i + 2 if kind == "upsamplers" else 3 * i + j)
