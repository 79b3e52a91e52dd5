"""sd-scripts' LoRA network (``--network_module networks.lora``) for SD 1.x/2.x and SDXL models of any width.

Same module interface, key names, scale rule (alpha / dim), initialisation, dropouts, block-wise dims and learning
rates, LoRA+ groups and file layout as kohya sd-scripts, so files and habits move between the two unchanged.
SDXL UNet modules are named after sd-scripts' SGM-layout UNet (``lora_unet_input_blocks_…``, see sdxl_names.py)
and two text encoders are ``lora_te1``/``lora_te2``; block indices follow sd-scripts' schemes (lora_blocks.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from library.errors import UserError
from library.io import atomic_save, load_pickle_checkpoint, load_safetensors, save_safetensors
from library.metadata import precalculate_safetensors_hashes
from library.models.sgm_names import SgmNames, is_sdxl_unet
from networks.lora_blocks import (
    LR_WEIGHT_KEYS,
    block_slots,
    get_block_index,
    parse_block_lr_weight,
    parse_number,
    parse_number_list,
    unet_block_layout,
)

logger = logging.getLogger(__name__)

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPMLP")
KNOWN_NETWORK_ARGS = frozenset(
    "conv_dim conv_alpha block_dims block_alphas conv_block_dims conv_block_alphas block_lr_zero_threshold "
    "rank_dropout module_dropout loraplus_lr_ratio loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio".split()
).union(LR_WEIGHT_KEYS)


class LoRAModule(torch.nn.Module):
    """Adds ``up(down(x)) * multiplier * alpha / dim`` to one Linear or Conv2d by replacing its ``forward``."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            k, s, p = org_module.kernel_size, org_module.stride, org_module.padding
            self.lora_down = torch.nn.Conv2d(org_module.in_channels, self.lora_dim, k, s, p, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # a plain list keeps the base layer out of this module's state dict
        self._org_forward = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (idempotent)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output plus ``up(down(x)) * (multiplier * scale)``, in the base output's dtype.

        The two factors are one multiply, skipped when it is 1 (x * 1.0 is exact), and dtype casts happen only when
        the base model runs in another precision than the LoRA weights, so the common fp32 case costs no extra op.
        """
        org_out = self._org_forward(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out
        lora_down = self.lora_down
        dtype = lora_down.weight.dtype
        lx = lora_down(x if x.dtype == dtype else x.to(dtype))  # base model may be in a lower precision
        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale / (1.0 - self.rank_dropout)
        out = self.lora_up(lx)
        factor = self.multiplier * scale
        if factor != 1.0:
            out = out * factor
        return org_out + (out if out.dtype == org_out.dtype else out.to(org_out.dtype))

    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Add this LoRA's weights (``lora_up.weight``/``lora_down.weight`` in ``sd``) into the base layer."""
        up = sd["lora_up.weight"].to(device, torch.float)
        down = sd["lora_down.weight"].to(device, torch.float)
        weight = self.org_module.weight
        merged = weight.detach().to(device, torch.float) + self.multiplier * delta_weight(up, down) * self.scale
        with torch.no_grad():
            weight.copy_(merged.to(dtype or weight.dtype))


def delta_weight(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The full weight ``up @ down`` of a LoRA pair for Linear, 1x1 and kxk convolutions (unscaled).

    The up half of a convolution pair is always 1x1, so one matrix product gives the kxk kernel (the same numbers
    sd-scripts gets from a convolution of the two kernels).
    """
    if down.dim() == 2:
        return up @ down
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def text_encoder_module_path(path: str) -> str:
    """transformers-4 spelling of a CLIP module path (``text_model.encoder…``), which every LoRA file uses."""
    return path if path.startswith("text_model.") or path == "text_model" else f"text_model.{path}"


def normalize_lora_key(key: str) -> str:
    """Map a text-encoder key written without ``text_model`` (transformers-5 tools) onto the standard spelling."""
    m = re.match(r"(lora_te\d?_)(encoder_|embeddings_|final_layer_norm)", key)
    return f"{m.group(1)}text_model_{key[len(m.group(1)) :]}" if m else key


class LoRANetwork(torch.nn.Module):
    """One model's LoRA modules; the state dict is the LoRA file (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``)."""

    def __init__(
        self,
        text_encoder,
        unet,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        block_dims: Sequence[int] | None = None,
        block_alphas: Sequence[float] | None = None,
        conv_block_dims: Sequence[int] | None = None,
        conv_block_alphas: Sequence[float] | None = None,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight: list[float] | None = None
        self.block_layout = unet_block_layout(unet) if block_dims is not None else None

        def dim_alpha(name: str, is_unet: bool, low_rank_kind: bool) -> tuple[int | None, float | None]:
            if modules_dim is not None:
                return modules_dim.get(name), (modules_alpha or {}).get(name)
            if is_unet and block_dims is not None:
                idx = get_block_index(name, self.block_layout)
                if low_rank_kind:
                    return block_dims[idx], block_alphas[idx]
                if conv_block_dims is not None:
                    return conv_block_dims[idx], conv_block_alphas[idx]
                return None, None
            if low_rank_kind:
                return lora_dim, alpha
            return conv_lora_dim, conv_alpha

        sgm = SgmNames(unet.config) if unet is not None and is_sdxl_unet(unet) else None
        self.sdxl_diffusers_names: dict[str, str] = {}  # diffusers-spelled SDXL UNet LoRA name → ours (SGM)

        def create_modules(prefix: str, root: torch.nn.Module, targets: Iterable[str], is_unet: bool):
            loras, targets = [], tuple(targets)
            for name, module in root.named_modules():
                if not any(c.__name__ in targets for c in type(module).__mro__):
                    continue
                path = name if is_unet else text_encoder_module_path(name)
                for child_name, child in module.named_modules():
                    is_linear = isinstance(child, torch.nn.Linear)
                    is_conv = isinstance(child, torch.nn.Conv2d)
                    if not (is_linear or is_conv):
                        continue
                    lora_name = diffusers_name = f"{prefix}.{path}.{child_name}".replace(".", "_")
                    if is_unet and sgm is not None:  # sd-scripts names SDXL LoRA after its SGM-layout UNet
                        lora_name = f"{prefix}.{sgm.to_sgm(f'{path}.{child_name}')}".replace(".", "_")
                        self.sdxl_diffusers_names[diffusers_name] = lora_name
                    # a file may spell SDXL UNet modules the diffusers way
                    key = diffusers_name if modules_dim is not None and lora_name not in modules_dim else lora_name
                    dim, a = dim_alpha(key, is_unet, is_linear or (is_conv and child.kernel_size == (1, 1)))
                    if not dim:
                        continue
                    loras.append(
                        LoRAModule(lora_name, child, multiplier, dim, a, dropout, rank_dropout, module_dropout)
                    )
            return loras

        text_encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        self.text_encoder_loras: list[LoRAModule] = []
        for i, te in enumerate(text_encoders):
            if te is None:
                continue
            prefix = LORA_PREFIX_TEXT_ENCODER if len(text_encoders) == 1 else f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}"
            self.text_encoder_loras += create_modules(prefix, te, TEXT_ENCODER_TARGET_REPLACE_MODULE, False)
        targets = UNET_TARGET_REPLACE_MODULE
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            targets = targets + UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
        self.unet_loras: list[LoRAModule] = (
            create_modules(LORA_PREFIX_UNET, unet, targets, True) if unet is not None else []
        )
        logger.info(f"LoRA: {len(self.text_encoder_loras)} text encoder modules, {len(self.unet_loras)} UNet modules")
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicated lora name: {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def own_names(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA state dict in this network's names: text-encoder keys normalised and, for SDXL, UNet keys in
        diffusers spelling (``lora_unet_down_blocks_…``) renamed to sd-scripts' SGM names, as sd-scripts does."""
        sd = normalize_state_dict(sd)
        if not self.sdxl_diffusers_names:
            return sd
        renamed = {}
        for key, value in sd.items():
            head, dot, tail = key.partition(".")
            renamed[self.sdxl_diffusers_names.get(head, head) + dot + tail] = value
        return renamed

    def load_weights(self, file: str | os.PathLike):
        """Load a LoRA file into this network (non-strict, as sd-scripts); returns the missing/unexpected keys."""
        sd = self.own_names(load_lora_state_dict(file))
        own = self.state_dict()
        if own and not any(k in own for k in sd):
            raise UserError(f"{file}: no key of this file matches the network; is it a LoRA for this model type?")
        try:
            return self.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            msg = str(e).splitlines()[-1].strip()
            raise UserError(f"{file}: weights do not fit the network ({msg}); check --network_dim/--conv_dim") from e

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the LoRA modules into the models; modules of a part that is not applied are dropped."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            del self._modules[lora.lora_name]

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder, unet, weights_sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> None:
        """Add the LoRA weights of ``weights_sd`` (times the multiplier) into the base models' weights."""
        weights_sd = self.own_names(weights_sd)
        has_te = any(k.startswith(LORA_PREFIX_TEXT_ENCODER) for k in weights_sd)
        has_unet = any(k.startswith(LORA_PREFIX_UNET) for k in weights_sd)
        for lora in (self.text_encoder_loras if has_te else []) + (self.unet_loras if has_unet else []):
            head = lora.lora_name + "."
            sd = {k[len(head) :]: v for k, v in weights_sd.items() if k.startswith(head)}
            if "lora_up.weight" in sd and "lora_down.weight" in sd:
                lora.merge_to(sd, dtype, device)
        unused = {k.split(".")[0] for k in weights_sd} - {
            m.lora_name for m in self.text_encoder_loras + self.unet_loras
        }
        if unused:
            logger.warning(f"{len(unused)} modules of the LoRA were not merged (no such layer), e.g. {min(unused)}")

    def set_block_lr_weight(self, block_lr_weight: list[float] | None) -> None:
        self.block_lr_weight = block_lr_weight

    def get_lr_weight(self, block_idx: int) -> float:
        return 1.0 if self.block_lr_weight is None else self.block_lr_weight[block_idx]

    def set_loraplus_lr_ratio(self, ratio=None, unet_ratio=None, text_encoder_ratio=None) -> None:
        self.loraplus_lr_ratio = ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """Optimizer param groups and their descriptions, as sd-scripts: LoRA+ puts ``lora_up`` in its own group
        at ``lr * ratio``; block lr weights give one group per UNet block; groups whose lr is 0 or None are left out.
        """
        self.requires_grad_(True)
        all_params: list[dict] = []
        descriptions: list[str] = []

        def assemble(loras: list[LoRAModule], lr, ratio, label: str) -> None:
            groups: dict[str, list[torch.nn.Parameter]] = {"lora": [], "plus": []}
            for lora in loras:
                for name, param in lora.named_parameters():
                    groups["plus" if ratio is not None and "lora_up" in name else "lora"].append(param)
            for key, params in groups.items():
                if not params:
                    continue
                group_lr = None if lr is None else (lr * ratio if key == "plus" else lr)
                if not group_lr:
                    continue
                all_params.append({"params": params, "lr": group_lr})
                descriptions.append(label + (" plus" if key == "plus" else ""))

        if self.text_encoder_loras:
            te_lr = text_encoder_lr if text_encoder_lr is not None else default_lr
            te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            assemble(self.text_encoder_loras, te_lr, te_ratio, "textencoder")
        if self.unet_loras:
            base_lr = unet_lr if unet_lr is not None else default_lr
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            if self.block_lr_weight is not None:
                by_block: dict[int, list[LoRAModule]] = {}
                for lora in self.unet_loras:
                    idx = get_block_index(lora.lora_name, self.block_layout or (12, 3))
                    by_block.setdefault(idx, []).append(lora)
                for idx, loras in by_block.items():
                    lr = None if base_lr is None else base_lr * self.get_lr_weight(idx)
                    assemble(loras, lr, ratio, f"unet_block{idx}")
            else:
                assemble(self.unet_loras, base_lr, ratio, "unet")
        return all_params, descriptions

    def enable_gradient_checkpointing(self) -> None:
        """LoRA layers are tiny; checkpointing of the base models is enabled on the models themselves."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, text_encoder, unet) -> None:
        """Nothing to do per step; present so the engine can call it unconditionally."""

    def get_trainable_params(self):
        return self.parameters()

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None):
        """Write the LoRA atomically: safetensors with ``sshs_*`` hashes in the metadata, or a torch pickle."""
        sd = {k: v.detach().to("cpu", dtype=dtype) if dtype else v.detach().cpu() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, metadata)
            save_safetensors(sd, file, metadata)
        else:
            atomic_save(file, lambda tmp: torch.save(sd, tmp))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """Scale each pair so the norm of ``up @ down * alpha / dim`` is at most ``max_norm_value`` (both halves
        by the square root of the ratio); returns (pairs scaled, mean norm, max norm) as sd-scripts does."""
        keys_scaled, norms = 0, []
        for lora in self.text_encoder_loras + self.unet_loras:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            updown = delta_weight(up.to(device), down.to(device)) * (lora.alpha.to(device) / down.shape[0])
            norm = updown.norm().clamp(min=max_norm_value / 2)
            desired = torch.clamp(norm, max=max_norm_value)
            ratio = desired.cpu() / norm.cpu()
            if ratio != 1:
                keys_scaled += 1
                up.mul_(ratio.sqrt().to(up.device, up.dtype))
                down.mul_(ratio.sqrt().to(down.device, down.dtype))
            norms.append((updown.norm().cpu() * ratio).item())
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors, or a weights-only pickle (``.ckpt``/``.pt``)."""
    if Path(file).suffix.lower() == ".safetensors":
        return load_safetensors(file)[0]
    return load_pickle_checkpoint(file)


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {normalize_lora_key(k): v for k, v in sd.items()}


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """Build a LoRA network from sd-scripts' flags; ``kwargs`` are the ``--network_args`` (strings are parsed)."""
    for key in kwargs:
        if key not in KNOWN_NETWORK_ARGS:
            logger.warning(
                f"--network_args {key}: not used by networks.lora (known: {', '.join(sorted(KNOWN_NETWORK_ARGS))})"
            )
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = parse_number(kwargs, "conv_dim", int)
    conv_alpha = parse_number(kwargs, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    block_wise = any(kwargs.get(k) is not None for k in ("block_dims",) + LR_WEIGHT_KEYS)
    block_dims = block_alphas = conv_block_dims = conv_block_alphas = block_lr_weight = None
    if block_wise:
        layout = unet_block_layout(unet)
        n = sum(block_slots(layout))
        block_lr_weight = parse_block_lr_weight(kwargs, layout)
        block_dims = parse_number_list(kwargs, "block_dims", int, n) or [network_dim] * n
        block_alphas = parse_number_list(kwargs, "block_alphas", float, n) or [network_alpha] * n
        conv_block_dims = parse_number_list(kwargs, "conv_block_dims", int, n)
        if conv_block_dims is not None:
            conv_block_alphas = parse_number_list(kwargs, "conv_block_alphas", float, n) or [conv_alpha or 1.0] * n
        elif conv_dim is not None:
            conv_block_dims, conv_block_alphas = [conv_dim] * n, [conv_alpha] * n
        if block_lr_weight is not None:
            for i, w in enumerate(block_lr_weight):
                if w == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim,
        alpha=network_alpha,
        dropout=neuron_dropout,
        rank_dropout=parse_number(kwargs, "rank_dropout", float),
        module_dropout=parse_number(kwargs, "module_dropout", float),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        block_dims=block_dims,
        block_alphas=block_alphas,
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
    )
    ratios = [parse_number(kwargs, f"loraplus_{k}lr_ratio", float) for k in ("", "unet_", "text_encoder_")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    return network


def create_network_from_weights(
    multiplier: float, file, vae, text_encoder, unet, weights_sd=None, for_inference: bool = False, **kwargs
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (dim and alpha per module; alpha defaults to dim for old files).

    Weights are not loaded (call ``load_weights`` or ``merge_to``); returns the network and the file's tensors.
    """
    weights_sd = normalize_state_dict(load_lora_state_dict(file) if weights_sd is None else weights_sd)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        name = key.split(".")[0]
        if key.endswith(".alpha"):
            modules_alpha[name] = float(value.float().item())
        elif "lora_down" in key:
            modules_dim[name] = value.shape[0]
    if not modules_dim:
        raise UserError(f"{file}: no lora_down weights found; this is not a LoRA file networks.lora can read")
    for name, dim in modules_dim.items():
        modules_alpha.setdefault(name, float(dim))
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha
    )
    if unet is not None and any(kwargs.get(k) is not None for k in LR_WEIGHT_KEYS):
        network.block_layout = unet_block_layout(unet)
        network.set_block_lr_weight(parse_block_lr_weight(kwargs, network.block_layout))
    ratios = [parse_number(kwargs, f"loraplus_{k}lr_ratio", float) for k in ("", "unet_", "text_encoder_")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network, weights_sd
