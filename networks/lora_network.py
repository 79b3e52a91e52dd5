"""The network object of ``networks.lora``: one module per adapted layer, sd-scripts' network interface.

Layers are chosen by a preset (networks/presets.py; sd-scripts' targets by default) and adapted by sd-scripts'
LoRA module or, for ``algo=loha|lokr|full``, DoRA and Tucker, by LyCORIS's adapters (networks/adapters.py). The
state dict is the file: ``lora_unet_…``, ``lora_te_…`` / ``lora_te1_…`` module names with each algo's tensor keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from library.errors import UserError
from library.models.sgm_names import SgmNames, is_sdxl_unet
from networks.adapters import ADAPTERS, WeightAdapter, adapter_from_weights
from networks.lora_blocks import get_block_index, unet_block_layout
from networks.lora_modules import (
    LoRAModule,
    delta_weight,
    load_lora_state_dict,
    module_tensors,
    normalize_state_dict,
    text_encoder_module_path,
)
from networks.network_base import NetworkBase, loraplus_groups
from networks.presets import Preset, default_preset

logger = logging.getLogger(__name__)

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
EVERY_LAYER = Preset(("Module",), (), ("Module",), enable_conv=True, name="every layer")


def te_spellings(path: str) -> tuple[str, ...]:
    """A text-encoder module path with ``text_model.`` first (the file spelling), then as the model names it."""
    full = text_encoder_module_path(path)
    return (full, path) if full != path else (full,)


def layout_of(sd: dict[str, torch.Tensor]) -> str:
    """The algo a module's tensors in a file belong to (lora, locon with DoRA/Tucker, loha, lokr, full)."""
    if "hada_w1_a" in sd:
        return "loha"
    if "lokr_w1" in sd or "lokr_w1_a" in sd:
        return "lokr"
    if "diff" in sd:
        return "full"
    if "lora_down.weight" in sd:
        return "locon" if "dora_scale" in sd or "lora_mid.weight" in sd else "lora"
    return "unknown"


def kind_of(module: torch.nn.Module) -> str:
    return module.algo if isinstance(module, WeightAdapter) else "lora"


class LoRANetwork(NetworkBase):
    """One model's adapter modules; the state dict is the network file.

    ``modules_sd`` (a file's tensors per module) builds the network a file describes: every layer the file names
    gets the module its keys call for. Otherwise ``algo`` and ``adapter_kwargs`` (DoRA, Tucker, LoKr factors…) say
    which module adapts each targeted layer.
    """

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
        algo: str = "lora",
        adapter_kwargs: dict | None = None,
        preset: Preset | None = None,
        modules_sd: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.algo = algo
        self.block_lr_weight: list[float] | None = None
        self.block_layout = unet_block_layout(unet) if block_dims is not None else None
        if modules_dim is not None:
            modules_sd = {name: {"lora_down.weight": torch.empty(dim, 0)} for name, dim in modules_dim.items()}
            for name, a in (modules_alpha or {}).items():
                modules_sd.setdefault(name, {})["alpha"] = torch.tensor(a)
        conv = conv_lora_dim is not None or conv_block_dims is not None
        preset = EVERY_LAYER if modules_sd is not None else (preset or default_preset(conv))
        adapter_kwargs = dict(adapter_kwargs or {})
        plain = algo in ("lora", "locon") and not adapter_kwargs.get("weight_decompose")

        def dim_alpha(name: str, is_unet: bool, low_rank_kind: bool) -> tuple[int | None, float | None]:
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

        def build(lora_name: str, key: str, layer: torch.nn.Module, is_unet: bool) -> torch.nn.Module | None:
            if modules_sd is not None:
                sd = modules_sd.get(key)
                if sd is None:
                    return None
                adapter = adapter_from_weights(lora_name, layer, sd, multiplier)
                if adapter is not None or "lora_down.weight" not in sd:
                    return adapter
                dim = sd["lora_down.weight"].shape[0]
                return LoRAModule(lora_name, layer, multiplier, dim, sd.get("alpha", dim))
            is_conv = isinstance(layer, torch.nn.Conv2d)
            dim, a = dim_alpha(key, is_unet, not is_conv or layer.kernel_size == (1, 1))
            if not dim:
                return None
            kxk = is_conv and layer.kernel_size != (1, 1)
            if plain and not (kxk and adapter_kwargs.get("use_tucker")):
                return LoRAModule(lora_name, layer, multiplier, dim, a, dropout, rank_dropout, module_dropout)
            cls = ADAPTERS["locon" if algo in ("lora", "locon") else algo]
            drops = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
            return cls(lora_name, layer, multiplier, dim, a, **drops, **adapter_kwargs)

        sgm = SgmNames(unet.config) if unet is not None and is_sdxl_unet(unet) else None
        self.sdxl_diffusers_names: dict[str, str] = {}  # diffusers-spelled SDXL UNet LoRA name → ours (SGM)

        def create_modules(prefix: str, root: torch.nn.Module, is_unet: bool) -> list[torch.nn.Module]:
            loras = []
            spellings = (lambda p: (p,)) if is_unet else te_spellings
            for path, layer in preset.targets(root, is_unet, spellings):
                lora_name = diffusers_name = f"{prefix}.{path}".replace(".", "_")
                if is_unet and sgm is not None:  # sd-scripts names SDXL LoRA after its SGM-layout UNet
                    lora_name = f"{prefix}.{sgm.to_sgm(path)}".replace(".", "_")
                    self.sdxl_diffusers_names[diffusers_name] = lora_name
                # a file may spell SDXL UNet modules the diffusers way
                key = diffusers_name if modules_sd is not None and lora_name not in modules_sd else lora_name
                module = build(lora_name, key, layer, is_unet)
                if module is not None:
                    loras.append(module)
            return loras

        text_encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        self.text_encoder_loras: list[torch.nn.Module] = []
        for i, te in enumerate(text_encoders):
            if te is None:
                continue
            prefix = LORA_PREFIX_TEXT_ENCODER if len(text_encoders) == 1 else f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}"
            self.text_encoder_loras += create_modules(prefix, te, False)
        self.unet_loras: list[torch.nn.Module] = (
            create_modules(LORA_PREFIX_UNET, unet, True) if unet is not None else []
        )
        logger.info(f"LoRA: {len(self.text_encoder_loras)} text encoder modules, {len(self.unet_loras)} UNet modules")
        self.register_loras()

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
        """Load a network file into this network (non-strict, as sd-scripts); returns the missing/unexpected keys.

        A module whose keys in the file belong to another algo is refused: build the network from the file
        (``--dim_from_weights``) or pass the file's ``algo``."""
        sd = self.own_names(load_lora_state_dict(file))
        own = self.state_dict()
        if own and not any(k in own for k in sd):
            found = sorted({layout_of(t) for t in module_tensors(sd).values()})
            raise UserError(
                f"{file}: no key of this file matches the network (file: {', '.join(found)}, network: {self.algo}); "
                "pass the file's algo in --network_args or use --dim_from_weights"
            )
        grouped = module_tensors(sd)
        for lora in self.loras:
            tensors = grouped.get(lora.lora_name)
            if tensors is not None and layout_of(tensors) not in (kind_of(lora), "unknown"):
                if not (kind_of(lora) == "locon" and layout_of(tensors) == "lora"):
                    raise UserError(
                        f"{file}: {lora.lora_name} is {layout_of(tensors)} in the file but {kind_of(lora)} here; "
                        "pass the file's algo (and dora_wd) in --network_args or use --dim_from_weights"
                    )
        return self.load_matching(file, sd, "--network_dim/--conv_dim")

    def merge_to(self, text_encoder, unet, weights_sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> None:
        """Add the weight changes of ``weights_sd`` (times the multiplier) into the base models' weights."""
        weights_sd = self.own_names(weights_sd)
        has_te = any(k.startswith(LORA_PREFIX_TEXT_ENCODER) for k in weights_sd)
        has_unet = any(k.startswith(LORA_PREFIX_UNET) for k in weights_sd)
        grouped = module_tensors(weights_sd)
        for lora in (self.text_encoder_loras if has_te else []) + (self.unet_loras if has_unet else []):
            sd = grouped.get(lora.lora_name, {})
            if isinstance(lora, WeightAdapter):
                if sd:
                    lora.merge_to(sd, dtype, device)
            elif "lora_up.weight" in sd and "lora_down.weight" in sd:
                lora.merge_to(sd, dtype, device)
        unused = set(grouped) - {m.lora_name for m in self.loras}
        if unused:
            logger.warning(f"{len(unused)} modules of the LoRA were not merged (no such layer), e.g. {min(unused)}")

    def set_block_lr_weight(self, block_lr_weight: list[float] | None) -> None:
        self.block_lr_weight = block_lr_weight

    def get_lr_weight(self, block_idx: int) -> float:
        return 1.0 if self.block_lr_weight is None else self.block_lr_weight[block_idx]

    def is_up(self, lora: torch.nn.Module, name: str) -> bool:
        """LoRA+'s up half: ``lora_up`` of a LoRA pair, or the adapter's own up factors."""
        return name in lora.up_names if isinstance(lora, WeightAdapter) else "lora_up" in name

    def unet_groups(self, lr: float | None, ratio: float | None) -> tuple[list[dict], list[str]]:
        """With block lr weights, one UNet group per block at ``lr * weight`` (as sd-scripts); else one group."""
        if self.block_lr_weight is None:
            return super().unet_groups(lr, ratio)
        by_block: dict[int, list[torch.nn.Module]] = {}
        for lora in self.unet_loras:
            by_block.setdefault(get_block_index(lora.lora_name, self.block_layout or (12, 3)), []).append(lora)
        groups: list[dict] = []
        names: list[str] = []
        for idx, loras in by_block.items():
            block_lr = None if lr is None else lr * self.get_lr_weight(idx)
            more_groups, more_names = loraplus_groups(loras, block_lr, ratio, f"unet_block{idx}", self.is_up)
            groups += more_groups
            names += more_names
        return groups, names

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """Scale each module so the norm of its weight change is at most ``max_norm_value``; returns (modules
        scaled, mean norm, max norm) as sd-scripts does. LoRA pairs scale both halves by the ratio's square root,
        LyCORIS adapters one factor (their ``apply_max_norm``)."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            if isinstance(lora, WeightAdapter):
                scaled, norm = lora.apply_max_norm(max_norm_value, device)
                keys_scaled += int(scaled)
                norms.append(norm)
                continue
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
