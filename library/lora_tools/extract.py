"""What sd-scripts' networks/extract_lora_from_models.py computes: the difference between a tuned model and its
original, layer by layer on networks.lora's target layers, approximated by a truncated SVD into a LoRA file
(alpha = rank, factors clamped at a quantile), with the text encoder left out when it barely changed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_family import PRECISIONS, lora_from_delta, model_layers, write_lora_file
from library.models.components import Components
from library.models.load import load_model
from library.modelspec import build_modelspec
from networks.presets import default_preset

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class ExtractSettings:
    """extract_lora_from_models.py's flags (sd-scripts' names and defaults)."""

    model_org: str
    model_tuned: str
    save_to: str
    dim: int = 4
    conv_dim: int | None = None
    v2: bool = False
    v_parameterization: bool | None = None
    sdxl: bool = False
    device: str | None = None
    load_precision: str | None = None
    save_precision: str | None = None
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    no_metadata: bool = False
    load_original_model_to: str | None = None
    load_tuned_model_to: str | None = None


@dataclass(frozen=True)
class ExtractReport:
    """What an extraction wrote: module counts, whether the text encoder was kept, and the identical layers left out."""

    text_encoder_modules: int
    unet_modules: int
    text_encoder_kept: bool
    identical_layers: int
    path: str


def check_settings(s: ExtractSettings) -> None:
    """One-line UserErrors for flag values sd-scripts would fail on later (or silently misuse)."""
    if s.v2 and s.sdxl:
        raise UserError("--v2 and --sdxl cannot be given together; pick the base model's family")
    if s.dim < 1 or (s.conv_dim is not None and s.conv_dim < 1):
        raise UserError(f"--dim {s.dim} / --conv_dim {s.conv_dim}: ranks must be at least 1")
    if not 0.0 < s.clamp_quantile <= 1.0:
        raise UserError(f"--clamp_quantile {s.clamp_quantile}: give a quantile in (0, 1] (default 0.99)")
    if s.min_diff < 0:
        raise UserError(f"--min_diff {s.min_diff}: give a non-negative difference (default 0.01)")
    for flag, value in (("--load_precision", s.load_precision), ("--save_precision", s.save_precision)):
        if value is not None and value not in PRECISIONS:
            raise UserError(f"{flag} {value!r}: use one of {', '.join(PRECISIONS)}")


def target_layers(components: Components, conv: bool) -> dict[str, torch.nn.Module]:
    """The layers networks.lora adapts by default (sd-scripts' targets; ResNet and sampler blocks with ``conv``),
    by their LoRA module names."""
    preset = default_preset(conv)
    chosen = {id(layer) for layer in _walk_targets(preset, components)}
    return {name: layer for name, layer in model_layers(components).items() if id(layer) in chosen}


def _walk_targets(preset, components: Components):
    for encoder in components.text_encoders:
        for _, layer in preset.targets(encoder, False, lambda p: (p,)):
            yield layer
    for _, layer in preset.targets(components.unet, True, lambda p: (p,)):
        yield layer


def _load(path: str, role: str, s: ExtractSettings, device: str | None) -> Components:
    dtype = PRECISIONS[s.load_precision] if s.load_precision else torch.float32
    logger.info(f"loading {role} model: {path}")
    flag = "--model_org" if role == "original" else "--model_tuned"
    try:
        components = load_model(path, v2=True if s.v2 else None, v_parameterization=s.v_parameterization, dtype=dtype)
    except UserError as e:
        raise UserError(str(e).replace("--pretrained_model_name_or_path", flag)) from e
    family = components.family.name
    if s.sdxl and family != "sdxl":
        raise UserError(f"--sdxl: {role} model {path} is {family.upper()}, not SDXL; drop --sdxl or check the model")
    if s.v2 and family != "sd2":
        raise UserError(f"--v2: {role} model {path} is {family.upper()}, not SD 2.x; drop --v2 or check the model")
    if device:
        for model in (components.unet, *components.text_encoders):
            model.to(device)
    return components


def _paired_layers(org: Components, tuned: Components, s: ExtractSettings):
    if org.family.name != tuned.family.name:
        raise UserError(
            f"--model_org {s.model_org} is {org.family.name.upper()} but --model_tuned {s.model_tuned} is "
            f"{tuned.family.name.upper()}; extract needs two models of one architecture"
        )
    conv = s.conv_dim is not None
    org_layers, tuned_layers = target_layers(org, conv), target_layers(tuned, conv)
    for name, layer in org_layers.items():
        other = tuned_layers.get(name)
        if other is None or other.weight.shape != layer.weight.shape:
            found = "missing" if other is None else f"shaped {tuple(other.weight.shape)}"
            raise UserError(
                f"--model_tuned {s.model_tuned}: layer {name} is {found} but {tuple(layer.weight.shape)} in "
                f"--model_org {s.model_org}; the models have different architectures (another width or version?)"
            )
    return org_layers, tuned_layers


def _difference(org_layer: torch.nn.Module, tuned_layer: torch.nn.Module, device: str) -> torch.Tensor:
    return tuned_layer.weight.detach().to(device) - org_layer.weight.detach().to(device)


def extract_rank(weight_shape: torch.Size, dim: int, conv_dim: int | None) -> int:
    """sd-scripts' rank for a layer: ``conv_dim`` for kxk convs (when given), else ``dim``, capped at the layer's
    in and out features/channels."""
    kxk = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
    rank = conv_dim if kxk and conv_dim is not None else dim
    return min(rank, weight_shape[0], weight_shape[1])


def extract_lora(s: ExtractSettings) -> ExtractReport:
    """Load both models, extract the LoRA and write it to ``s.save_to`` with sd-scripts' metadata."""
    check_settings(s)
    org = _load(s.model_org, "original", s, s.load_original_model_to)
    tuned = _load(s.model_tuned, "tuned", s, s.load_tuned_model_to)
    org_layers, tuned_layers = _paired_layers(org, tuned, s)
    work = "cpu"
    te_names = [n for n in org_layers if n.startswith("lora_te")]
    te_change = max(
        (float(_difference(org_layers[n], tuned_layers[n], work).abs().max()) for n in te_names), default=0.0
    )
    te_kept = te_change > s.min_diff
    if te_kept:
        logger.info(f"Text encoder is different. {te_change} > {s.min_diff}")
    else:
        logger.warning("Text encoder is same. Extract U-Net only.")
    names = [n for n in org_layers if te_kept or not n.startswith("lora_te")]
    clamp = s.clamp_quantile if s.clamp_quantile < 1.0 else None
    tensors: dict[str, torch.Tensor] = {}
    identical = 0
    with torch.no_grad():
        for name in tqdm(names, desc="extracting (SVD)", unit="layer", dynamic_ncols=True):
            diff = _difference(org_layers[name], tuned_layers[name], work)
            if not diff.any():
                identical += 1
                continue
            mat = diff.to(s.device or work, dtype=torch.float32)
            rank = extract_rank(diff.shape, s.dim, s.conv_dim)
            up, down, alpha = lora_from_delta(mat, rank, clamp_quantile=clamp)
            tensors[f"{name}.lora_up.weight"] = up.cpu()
            tensors[f"{name}.lora_down.weight"] = down.cpu()
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not tensors:
        raise UserError(
            f"--model_tuned {s.model_tuned}: every target layer equals --model_org's (or only the text encoder "
            f"changed, by at most {te_change:g} <= --min_diff {s.min_diff}); there is nothing to extract"
        )
    metadata = extraction_metadata(s, org)
    Path(s.save_to).parent.mkdir(parents=True, exist_ok=True)
    write_lora_file(s.save_to, tensors, metadata, s.save_precision)
    modules = [k.removesuffix(".alpha") for k in tensors if k.endswith(".alpha")]
    te_count = sum(m.startswith("lora_te") for m in modules)
    report = ExtractReport(te_count, len(modules) - te_count, te_kept, identical, s.save_to)
    logger.info(
        f"extracted {len(modules)} LoRA modules ({report.text_encoder_modules} text encoder, {report.unet_modules} "
        f"UNet; {identical} identical layers left out) at dim {s.dim}"
        + (f", conv_dim {s.conv_dim}" if s.conv_dim is not None else "")
        + f"; saved to {s.save_to}"
    )
    return report


def extraction_metadata(s: ExtractSettings, org: Components) -> dict[str, str]:
    """sd-scripts' minimum ``ss_*`` metadata for an extracted LoRA, plus ``modelspec.*`` unless ``--no_metadata``."""
    family = org.family
    v_param = s.v_parameterization if s.v_parameterization is not None else org.v_parameterization
    net_kwargs = {} if s.conv_dim is None else {"conv_dim": str(s.conv_dim), "conv_alpha": str(float(s.conv_dim))}
    metadata = {
        "ss_v2": str(family.name == "sd2"),
        "ss_base_model_version": family.base_model_version(v_param),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(s.dim),
        "ss_network_alpha": str(float(s.dim)),
        "ss_network_args": json.dumps(net_kwargs),
    }
    if not s.no_metadata:
        title = Path(s.save_to).stem
        metadata.update(build_modelspec(family, v_param, True, False, time.time(), title=title))
    return metadata
