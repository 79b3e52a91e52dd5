"""Per-tensor statistics of a LoRA-family file (sd-scripts' check_lora_weights.py lines) and the modules that change
nothing (an all-zero factor: never trained) or hold NaN/inf, for LoRA, LoCon, LoHa, LoKr, full, DoRA and OFT keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

LOW_RANK = ("lora_up", "lora_down", "lora_mid", "lora_A", "lora_B")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
FULL = ("diff", "diff_b")
OFT = ("oft_blocks", "oft_diag")
WEIGHT_COMPONENTS = frozenset(LOW_RANK + LOHA + LOKR + FULL + OFT)
EXTRA_COMPONENTS = frozenset(("alpha", "dora_scale", "rescale", "scalar"))
SHOWN = WEIGHT_COMPONENTS | {"dora_scale"}  # listed by default; alpha and the rest with --show_all_keys
# Products whose delta is zero when any one listed factor is all zero: each inner tuple is one factor's alternatives
# (a factor is stored whole or as the named parts of its own product).
ZERO_FACTORS = {
    "lora": (("lora_up", "lora_B"), ("lora_down", "lora_A"), ("lora_mid",)),
    "loha": (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2")),
    "lokr": (("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
}


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, component)`` of a network key, e.g. ``lora_unet_x.lora_up.weight`` -> (``lora_unet_x``,
    ``lora_up``) and PEFT's ``a.b.lora_A.weight`` -> (``a.b``, ``lora_A``); None for a key of no known component."""
    parts = key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part in WEIGHT_COMPONENTS or part in EXTRA_COMPONENTS:
            return ".".join(parts[:i]), part
    return None


def module_kind(components: set[str]) -> str:
    """The network type a module's components say: lora (LoRA/LoCon/DyLoRA), loha, lokr, full or oft."""
    for kind, names in (("loha", LOHA), ("lokr", LOKR), ("full", FULL), ("oft", OFT)):
        if components & set(names):
            return kind
    return "lora"


def tensor_line(key: str, value: torch.Tensor) -> str:
    """sd-scripts' line: ``key,(shape-with-dashes),mean |x|,min |x|`` (the numbers as plain floats)."""
    v = value.detach().to(torch.float32).abs()
    shape = str(tuple(value.shape)).replace(", ", "-")
    mean, low = (v.mean().item(), v.min().item()) if v.numel() else (float("nan"), float("nan"))
    return f"{key},{shape},{mean:.8g},{low:.8g}"


@dataclass
class ModuleCheck:
    """One module's findings: its type, why its update is zero (None when it is not), its non-finite tensors."""

    name: str
    kind: str
    zero_reason: str | None = None
    non_finite: list[str] = field(default_factory=list)


def _all_zero(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in tensors and not tensors[n].any()), None)


def check_module(name: str, tensors: Mapping[str, torch.Tensor]) -> ModuleCheck:
    """Findings for one module given its tensors by component name (``lora_up``, ``hada_w1_a``, ``alpha``…)."""
    kind = module_kind(set(tensors))
    check = ModuleCheck(name, kind)
    check.non_finite = sorted(c for c, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if kind in ZERO_FACTORS:
        zero = next((z for f in ZERO_FACTORS[kind] if (z := _all_zero(tensors, f))), None)
        check.zero_reason = f"{zero} is all zero" if zero else None
    elif kind == "full":
        diffs = [c for c in FULL if c in tensors]
        check.zero_reason = f"{' and '.join(diffs)} all zero" if all(not tensors[c].any() for c in diffs) else None
    elif kind == "oft":
        component, blocks = next((c, tensors[c]) for c in OFT if c in tensors)
        if blocks.dim() == 3 and torch.equal(blocks, blocks.transpose(1, 2)):
            check.zero_reason = f"{component} has no skew-symmetric part (identity rotation)"
    return check


@dataclass
class WeightsReport:
    """A whole file's findings: network keys (sd-scripts' order), the other keys, and each module's check."""

    network_keys: list[str]
    other_keys: list[str]
    modules: list[ModuleCheck]

    @property
    def untrained(self) -> list[ModuleCheck]:
        return [m for m in self.modules if m.zero_reason]

    @property
    def non_finite(self) -> list[ModuleCheck]:
        return [m for m in self.modules if m.non_finite]

    def summary(self) -> str:
        """The closing line: modules, tensors, how many never changed anything and how many hold NaN/inf."""
        return (
            f"checked {len(self.modules)} module(s) ({len(self.network_keys)} weight tensor(s)): "
            f"{len(self.untrained)} untrained (zero update), {len(self.non_finite)} with NaN/inf"
        )


def check_weights(sd: Mapping[str, torch.Tensor]) -> WeightsReport:
    """Group the keys by module and check each module; a module is one with at least one weight component."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        split = split_key(key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = value
    modules = [check_module(n, t) for n, t in grouped.items() if WEIGHT_COMPONENTS & set(t)]
    names = {m.name for m in modules}
    network_keys, other_keys = [], []
    for key in sd:
        split = split_key(key)
        in_module = split is not None and split[0] in names
        (network_keys if in_module and split[1] in SHOWN else other_keys).append(key)
    return WeightsReport(network_keys, other_keys, modules)
