"""What the networks of networks.lora, networks.dylora and networks.oft share: the hook of one adapter into its base
layer, sd-scripts' network interface (the engine's hooks, multiplier, hooking into the models, saving) and LoRA+
parameter groups.

A subclass keeps its adapter modules in ``text_encoder_loras`` and ``unet_loras``; each module has a
``lora_name``, a ``multiplier`` and ``apply_to()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from library.errors import UserError
from library.io import atomic_save, save_safetensors
from library.metadata import precalculate_safetensors_hashes


class HookedLayer(torch.nn.Module):
    """An adapter around one base layer (``self._org = [layer]``, kept in a list so the base layer stays out of the
    adapter's state dict), hooked in by replacing the layer's ``forward`` with the adapter's."""

    _org: list[torch.nn.Module]
    _org_forward: Callable | None = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (idempotent)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward


class NetworkBase(torch.nn.Module):
    """The parts of sd-scripts' network interface that do not depend on the kind of adapter."""

    text_encoder_loras: list[torch.nn.Module]
    unet_loras: list[torch.nn.Module]

    def __init__(self) -> None:
        super().__init__()
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None

    @property
    def loras(self) -> list[torch.nn.Module]:
        return self.text_encoder_loras + self.unet_loras

    def register_loras(self) -> None:
        """Add every module under its file name (``lora_unet_…``); a name reached twice is a bug in the targets."""
        for lora in self.loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicated lora name: {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the modules into the models; modules of a part that is not applied are dropped."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.loras:
            lora.apply_to()

    def _drop(self, loras: list[torch.nn.Module]) -> None:
        for lora in loras:
            del self._modules[lora.lora_name]

    def is_mergeable(self) -> bool:
        return True

    def set_loraplus_lr_ratio(self, ratio=None, unet_ratio=None, text_encoder_ratio=None) -> None:
        """LoRA+: the up halves train at ``ratio`` times the learning rate (per part, as sd-scripts)."""
        self.loraplus_lr_ratio = ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def is_up(self, lora: torch.nn.Module, name: str) -> bool:
        """Whether parameter ``name`` of ``lora`` is an up half (LoRA+ trains those at the ratio)."""
        return "lora_up" in name

    def unet_groups(self, lr: float | None, ratio: float | None) -> tuple[list[dict], list[str]]:
        """The UNet's optimizer groups: one (split under LoRA+); networks with block learning rates override it."""
        return loraplus_groups(self.unet_loras, lr, ratio, "unet", self.is_up)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """Optimizer param groups and their descriptions, as sd-scripts: text encoder, then UNet, each split in two
        under LoRA+ (up halves at ``lr * ratio``); groups whose learning rate is 0 or None are left out."""
        self.requires_grad_(True)
        groups: list[dict] = []
        names: list[str] = []
        if self.text_encoder_loras:
            te_lr = text_encoder_lr if text_encoder_lr is not None else default_lr
            te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            te_loras = self.text_encoder_loras
            more_groups, more_names = loraplus_groups(te_loras, te_lr, te_ratio, "textencoder", self.is_up)
            groups += more_groups
            names += more_names
        if self.unet_loras:
            unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            more_groups, more_names = self.unet_groups(unet_lr if unet_lr is not None else default_lr, unet_ratio)
            groups += more_groups
            names += more_names
        return groups, names

    def load_matching(self, file: str | os.PathLike, sd: dict[str, torch.Tensor], hint: str):
        """``load_state_dict`` of a file's tensors, non-strict as sd-scripts; tensors of the wrong shape are one line
        naming the file and ``hint`` (the flags that set the shapes). Returns the missing/unexpected keys."""
        try:
            return self.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            msg = str(e).splitlines()[-1].strip()
            raise UserError(f"{file}: weights do not fit the network ({msg}); check {hint}") from e

    def check_any_key_matches(self, file: str | os.PathLike, sd: dict[str, torch.Tensor], what: str) -> None:
        """A file none of whose keys belong to this network is one line (another network type or model type)."""
        own = self.state_dict()
        if own and not any(k in own for k in sd):
            raise UserError(f"{file}: no key of this file matches the network; is it {what} for this model type?")

    def enable_gradient_checkpointing(self) -> None:
        """Adapter layers are tiny; checkpointing of the base models is enabled on the models themselves."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, text_encoder, unet) -> None:
        """Nothing to do per step; present so the engine can call it unconditionally."""

    def get_trainable_params(self):
        return self.parameters()

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None):
        """Write the network atomically: safetensors with ``sshs_*`` hashes in the metadata, or a torch pickle."""
        sd = {k: v.detach().to("cpu", dtype=dtype) if dtype else v.detach().cpu() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, metadata)
            save_safetensors(sd, file, metadata)
        else:
            atomic_save(file, lambda tmp: torch.save(sd, tmp))


def loraplus_groups(
    loras: Sequence[torch.nn.Module],
    lr: float | None,
    ratio: float | None,
    label: str,
    is_up: Callable[[torch.nn.Module, str], bool],
) -> tuple[list[dict], list[str]]:
    """One optimizer group of ``loras`` at ``lr``, split under LoRA+ so the up halves (``is_up(module, name)``)
    train at ``lr * ratio``; groups whose learning rate is 0 or None are left out (as sd-scripts)."""
    split: dict[str, list[torch.nn.Parameter]] = {"lora": [], "plus": []}
    for lora in loras:
        for name, param in lora.named_parameters():
            split["plus" if ratio is not None and is_up(lora, name) else "lora"].append(param)
    groups, names = [], []
    for key, params in split.items():
        if not params:
            continue
        group_lr = None if lr is None else (lr * ratio if key == "plus" else lr)
        if group_lr:
            groups.append({"params": params, "lr": group_lr})
            names.append(label + (" plus" if key == "plus" else ""))
    return groups, names
