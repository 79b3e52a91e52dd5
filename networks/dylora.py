"""sd-scripts' DyLoRA (``--network_module networks.dylora``): a LoRA trained one rank unit at a time, so that any
leading slice of its ranks works on its own, saved as a plain full-rank LoRA file that every LoRA loader reads.

Each training forward of a module draws ``b`` from Python's global ``random`` (as sd-scripts does; training states
save and restore it, so a resumed run draws the same ranks), lets only ranks ``[b, b + unit)`` take gradients and
scales the LoRA output by ``alpha / dim * sqrt(dim / (b + unit))``; the whole rank is always in the output.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.models.sgm_names import SgmNames, is_sdxl_unet
from networks.lora import (
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    delta_weight,
    load_lora_state_dict,
    normalize_state_dict,
    text_encoder_module_path,
)
from networks.lora_blocks import parse_number
from networks.network_base import HookedLayer, NetworkBase

logger = logging.getLogger(__name__)

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
KNOWN_NETWORK_ARGS = frozenset(("conv_dim", "conv_alpha", "unit") + LORAPLUS_ARGS)
DROPOUT_ARGS = ("rank_dropout", "module_dropout")


class DyLoRAModule(HookedLayer):
    """DyLoRA on one Linear or Conv2d: ``lora_A`` holds the down rows and ``lora_B`` the up columns, one parameter
    per rank as in sd-scripts (optimizers see the same tensors); the state dict is plain ``lora_down``/``lora_up``."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        unit: int = 1,
    ) -> None:
        super().__init__()
        if unit < 1 or lora_dim % unit:
            raise UserError(f"DyLoRA {lora_name}: rank {lora_dim} is not a multiple of unit={unit}; change one of them")
        self.lora_name, self.lora_dim, self.unit = lora_name, int(lora_dim), int(unit)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.spatial = tuple(org_module.kernel_size) != (1, 1)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.spatial = False
        a_shape = (1, in_dim, *org_module.kernel_size) if self.spatial else (1, in_dim)
        b_shape = (out_dim, 1, 1, 1) if self.spatial else (out_dim, 1)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(a_shape)) for _ in range(self.lora_dim)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b_shape)) for _ in range(self.lora_dim)])
        for p in self.lora_A:  # as sd-scripts (and Microsoft's LoRA): each rank row on its own
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = multiplier
        self._org = [org_module]  # a plain list keeps the base layer out of this module's state dict
        self._org_forward = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(lora_down, lora_up)`` weights in LoRA file shapes (1x1 convs as 4-D kernels)."""
        down = torch.cat(tuple(self.lora_A), dim=0)
        up = torch.cat(tuple(self.lora_B), dim=1)
        if self.is_conv and not self.spatial:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return down, up

    def draw_rank(self) -> int:
        """sd-scripts' per-forward draw: the first trained rank (a multiple of unit); only that unit takes grads."""
        rank = random.randint(0, self.lora_dim - 1)
        rank -= rank % self.unit
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            trained = rank <= i < rank + self.unit
            a.requires_grad_(trained)
            b.requires_grad_(trained)
        return rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the full-rank LoRA output, scaled by ``sqrt(dim / (rank + unit))`` for the rank drawn in
        training; in eval mode nothing is drawn and the factor is 1 (the saved file's plain-LoRA output)."""
        org_out = self._org_forward(x)
        factor = self.multiplier * self.scale
        if self.training:
            factor *= math.sqrt(self.lora_dim / (self.draw_rank() + self.unit))
        down, up = self.weights()
        h = x if x.dtype == down.dtype else x.to(down.dtype)  # base model may be in a lower precision
        if self.is_conv:
            org = self.org_module
            h = F.conv2d(h, down, None, org.stride, org.padding, org.dilation)
            h = F.conv2d(h, up)
        else:
            h = F.linear(F.linear(h, down), up)
        if factor != 1.0:
            h = h * factor
        return org_out + (h if h.dtype == org_out.dtype else h.to(org_out.dtype))

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The plain-LoRA layout ``lora_down.weight``, ``lora_up.weight``, ``alpha`` (not the per-rank tensors)."""
        if args:
            raise TypeError("DyLoRAModule.state_dict takes keyword arguments only")
        destination = {} if destination is None else destination
        down, up = self.weights()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        """Read plain-LoRA keys into the per-rank parameters (torch then loads them as ``lora_A.i``/``lora_B.i``)."""
        names = (prefix + "lora_down.weight", prefix + "lora_up.weight")
        down, up = state_dict.pop(names[0], None), state_dict.pop(names[1], None)
        current_down, current_up = (w.detach() for w in self.weights())
        if down is None or up is None:
            missing.extend(n for n, w in zip(names, (down, up)) if w is None)
            down, up = current_down, current_up
        elif down.shape != current_down.shape or up.shape != current_up.shape:
            errors.append(
                f"size mismatch for {names[0]}/{names[1]}: file {tuple(down.shape)}/{tuple(up.shape)}, "
                f"network {tuple(current_down.shape)}/{tuple(current_up.shape)}"
            )
            down, up = current_down, current_up
        if self.is_conv and not self.spatial:
            down, up = down.flatten(1), up.flatten(1)
        for i in range(self.lora_dim):
            state_dict[f"{prefix}lora_A.{i}"] = down[i : i + 1]
            state_dict[f"{prefix}lora_B.{i}"] = up[:, i : i + 1]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @torch.no_grad()
    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add the file's full-rank LoRA (``lora_up``/``lora_down`` in ``sd``) into the base layer's weight."""
        up = sd["lora_up.weight"].to(device, torch.float)
        down = sd["lora_down.weight"].to(device, torch.float)
        weight = self.org_module.weight
        merged = weight.detach().to(device, torch.float) + self.multiplier * delta_weight(up, down) * self.scale
        weight.copy_(merged.to(dtype or weight.dtype))


def target_layers(
    prefix: str, root: nn.Module, targets: Iterable[str], is_unet: bool, sgm: SgmNames | None
) -> Iterator[tuple[str, nn.Module]]:
    """``(lora name, layer)`` of every Linear/Conv2d inside a module of a target class, named as networks.lora names
    them (``text_model`` in text-encoder names, sd-scripts' SGM names for SDXL UNets)."""
    targets = tuple(targets)
    for name, module in root.named_modules():
        if not any(c.__name__ in targets for c in type(module).__mro__):
            continue
        path = name if is_unet else text_encoder_module_path(name)
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                full = f"{path}.{child_name}"
                if sgm is not None:
                    full = sgm.to_sgm(full)
                yield f"{prefix}.{full}".replace(".", "_"), child


class DyLoRANetwork(NetworkBase):
    """All DyLoRA modules of a model; the state dict is a plain LoRA file (``lora_unet_…``, ``lora_te_…``)."""

    def __init__(
        self,
        text_encoder,
        unet,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        apply_to_conv: bool = False,
        conv_alpha: float | None = None,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
        unit: int = 1,
    ) -> None:
        super().__init__()
        self.multiplier, self.lora_dim, self.alpha, self.unit = multiplier, lora_dim, alpha, unit
        sgm = SgmNames(unet.config) if unet is not None and is_sdxl_unet(unet) else None

        def create(prefix: str, root: nn.Module, targets: tuple[str, ...], is_unet: bool) -> list[DyLoRAModule]:
            loras = []
            for name, layer in target_layers(prefix, root, targets, is_unet, sgm if is_unet else None):
                if modules_dim is not None:
                    dim, a = modules_dim.get(name), (modules_alpha or {}).get(name)
                elif isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1):
                    dim, a = lora_dim, alpha
                elif apply_to_conv:
                    dim, a = lora_dim, alpha if conv_alpha is None else conv_alpha
                else:
                    dim = None
                if dim:
                    loras.append(DyLoRAModule(name, layer, multiplier, dim, a, unit))
            return loras

        encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        self.text_encoder_loras: list[DyLoRAModule] = []
        for i, te in enumerate(encoders):
            if te is not None:
                prefix = LORA_PREFIX_TEXT_ENCODER if len(encoders) == 1 else f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}"
                self.text_encoder_loras += create(prefix, te, TEXT_ENCODER_TARGETS, False)
        unet_targets = UNET_TARGETS + (UNET_CONV_TARGETS if modules_dim is not None or apply_to_conv else ())
        self.unet_loras = create(LORA_PREFIX_UNET, unet, unet_targets, True) if unet is not None else []
        logger.info(
            f"DyLoRA: {len(self.text_encoder_loras)} text encoder modules, {len(self.unet_loras)} UNet modules, "
            f"unit {unit}"
        )
        self.register_loras()

    def load_weights(self, file: str | os.PathLike):
        """Load a (Dy)LoRA file into this network, non-strict as sd-scripts; returns the missing/unexpected keys."""
        sd = normalize_state_dict(load_lora_state_dict(file))
        self.check_any_key_matches(file, sd, "a LoRA")
        return self.load_matching(file, sd, "--network_dim/conv_dim")

    def merge_to(self, text_encoder, unet, weights_sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> None:
        """Add the file's full-rank LoRA weights (times the multiplier) into the base models' weights."""
        weights_sd = normalize_state_dict(weights_sd)
        for lora in self.loras:
            head = lora.lora_name + "."
            sd = {k[len(head) :]: v for k, v in weights_sd.items() if k.startswith(head)}
            if sd:
                lora.merge_to(sd, dtype, device)
        logger.info(f"merged {len(self.loras)} DyLoRA modules")

    def is_up(self, lora: torch.nn.Module, name: str) -> bool:
        """LoRA+'s up half of a DyLoRA module: its ``lora_B`` columns."""
        return "lora_B" in name


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> DyLoRANetwork:
    """A DyLoRA network from sd-scripts' flags: ``--network_dim`` is the full rank, ``unit``, ``conv_dim`` (must
    equal the rank), ``conv_alpha`` (default: ``--network_alpha``, what sd-scripts uses) and LoRA+ ratios."""
    for key in kwargs:
        if key in DROPOUT_ARGS and parse_number(kwargs, key, float):
            logger.warning(f"--network_args {key}: DyLoRA has no dropout (as in sd-scripts); ignored")
        elif key not in KNOWN_NETWORK_ARGS and key not in DROPOUT_ARGS:
            logger.warning(
                f"--network_args {key}: not used by networks.dylora (known: {', '.join(KNOWN_NETWORK_ARGS)})"
            )
    if neuron_dropout:
        logger.warning("--network_dropout: DyLoRA has no dropout (as in sd-scripts); ignored")
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    unit = parse_number(kwargs, "unit", int) or 1
    if network_dim % unit:
        raise UserError(f"--network_dim {network_dim} is not a multiple of --network_args unit={unit}; change one")
    conv_dim = parse_number(kwargs, "conv_dim", int)
    if conv_dim is not None and conv_dim != network_dim:
        raise UserError(f"--network_args conv_dim={conv_dim}: DyLoRA needs conv_dim equal to --network_dim")
    network = DyLoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim,
        alpha=network_alpha,
        apply_to_conv=conv_dim is not None,
        conv_alpha=parse_number(kwargs, "conv_alpha", float),
        unit=unit,
    )
    ratios = [parse_number(kwargs, key, float) for key in LORAPLUS_ARGS]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network_from_weights(
    multiplier: float, file, vae, text_encoder, unet, weights_sd=None, for_inference: bool = False, **kwargs
) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a (Dy)LoRA file (rank and alpha per module; alpha defaults to the rank for old files);
    weights are not loaded. Returns the network and the file's tensors."""
    weights_sd = normalize_state_dict(load_lora_state_dict(file) if weights_sd is None else weights_sd)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, tail = key.partition(".")
        if tail == "alpha":
            modules_alpha[name] = float(value.float().item())
        elif tail == "lora_down.weight":
            modules_dim[name] = value.shape[0]
    if not modules_dim:
        raise UserError(f"{file}: no lora_down weights found; this is not a LoRA/DyLoRA file")
    for name, dim in modules_dim.items():
        modules_alpha.setdefault(name, float(dim))
    unit = parse_number(kwargs, "unit", int) or 1
    network = DyLoRANetwork(
        text_encoder, unet, multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha, unit=unit
    )
    ratios = [parse_number(kwargs, key, float) for key in LORAPLUS_ARGS]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network, weights_sd


def split_dylora(sd: dict[str, torch.Tensor], unit: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """sd-scripts' extract_lora_from_dylora: ``(rank, file tensors)`` for rank = unit, 2 unit, … below the largest
    rank, each module cut to its first ``rank`` ranks (``lora_down`` rows, ``lora_up`` columns); alphas are kept."""
    max_rank = max((v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")), default=0)
    for rank in range(unit, max_rank, unit):
        out = {}
        for key, value in sd.items():
            if key.endswith("lora_down.weight"):
                out[key] = value[:rank].contiguous()
            elif key.endswith("lora_up.weight"):
                out[key] = value[:, :rank].contiguous()
            else:
                out[key] = value
        yield rank, out
