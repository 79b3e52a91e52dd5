"""LyCORIS's weight adapters, native: LoCon with DoRA or Tucker, LoHa, LoKr and full (``diff``) modules.

Parameter names, shapes, initialisation, the scale rule (alpha / rank; 1 for a LoKr whose two halves are both full),
DoRA's weight decomposition (``dora_scale``, norm per output row unless ``wd_on_out=false``) and rank/module
dropout follow lycoris-lora 4.1 (lycoris/modules/{locon,loha,lokr,full}.py), so files move between the two
unchanged. Every adapter works on the layer's weight: the forward adds ``op(x, W' - W)`` where ``W'`` is the
adapted weight, which is exactly what merging writes into the model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from networks.network_base import HookedLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n == dimension``, ``m`` near ``factor``
    (``-1``: as square as possible)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def dora_norm(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """Norm of ``weight`` per output row (``wd_on_out``) or per input column, shaped to broadcast against it."""
    ones = [1] * (weight.dim() - 1)
    if wd_on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
    per_in = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_in.reshape(weight.shape[1], *ones).transpose(0, 1)


def weight_decompose(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float, wd_on_out: bool):
    """DoRA: ``W * (multiplier * (m / ||W|| - 1) + 1)`` with LyCORIS's epsilon on the norm."""
    weight = weight.to(dora_scale.dtype)
    scale = dora_scale / (dora_norm(weight, wd_on_out) + torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale


class WeightAdapter(HookedLayer, ABC):
    """A trainable change of one Linear/Conv2d weight, hooked into its ``forward``; subclasses give ``diff_weight``.

    ``dropout`` drops elements of the adapter's output, ``rank_dropout`` whole output rows of the weight change (as
    LyCORIS's rebuild forward), ``module_dropout`` skips the adapter for a step.
    """

    algo = ""
    up_names: tuple[str, ...] = ()  # parameters that LoRA+ trains at the higher rate

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        weight_decompose: bool = False,
        wd_on_out: bool = True,
        rank_dropout_scale: bool = False,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.shape = tuple(org_module.weight.shape)
        self.op_kwargs = (
            dict(stride=org_module.stride, padding=org_module.padding, dilation=org_module.dilation)
            | dict(groups=org_module.groups)
            if self.is_conv
            else {}
        )
        self.wd, self.wd_on_out = weight_decompose, wd_on_out
        if weight_decompose:
            self.dora_scale = nn.Parameter(dora_norm(org_module.weight.detach().float().cpu(), wd_on_out))
        self._org = [org_module]  # a plain list keeps the base layer out of this module's state dict
        self._org_forward = None

    @abstractmethod
    def diff_weight(self) -> torch.Tensor:
        """The scaled weight change ``ΔW`` (without the multiplier), in the layer's weight shape."""

    def diff_bias(self) -> torch.Tensor | None:
        return None

    def adapted(self, weight: torch.Tensor, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias changes ``W' - W`` this adapter makes to ``weight`` at ``multiplier``."""
        diff, diff_b = self.diff_weight(), self.diff_bias()
        if self.training and self.rank_dropout:
            drop = (torch.rand(diff.shape[0], device=diff.device) > self.rank_dropout).to(diff.dtype)
            if self.rank_dropout_scale:
                drop = drop / drop.mean()
            diff = diff * drop.view(-1, *[1] * (diff.dim() - 1))
            diff_b = None if diff_b is None else diff_b * drop
        if self.wd:
            weight = weight.to(diff.dtype)
            diff = weight_decompose(weight + diff, self.dora_scale, multiplier, self.wd_on_out) - weight
        elif multiplier != 1:
            diff = diff * multiplier
        if diff_b is not None and multiplier != 1:
            diff_b = diff_b * multiplier
        return diff, diff_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org_out = self._org_forward(x)
        if self.module_dropout and self.training and torch.rand(1) < self.module_dropout:
            return org_out
        diff, diff_b = self.adapted(self.org_module.weight.detach(), self.multiplier)
        diff = diff.to(x.dtype)
        diff_b = None if diff_b is None else diff_b.to(x.dtype)
        out = F.conv2d(x, diff, diff_b, **self.op_kwargs) if self.is_conv else F.linear(x, diff, diff_b)
        if self.dropout and self.training:
            out = F.dropout(out, p=self.dropout)
        return org_out + out.to(org_out.dtype)

    @torch.no_grad()
    def merge_to(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device) -> None:
        """Load this module's tensors from ``sd`` and add the weight change (times the multiplier) into the layer."""
        self.load_state_dict({k: v.to(torch.float) for k, v in sd.items()}, strict=False)
        self.to(device, torch.float)
        layer = self.org_module
        weight = layer.weight.detach().to(device, torch.float)
        diff, diff_b = self.adapted(weight, self.multiplier)
        layer.weight.copy_((weight + diff).to(dtype or layer.weight.dtype))
        if diff_b is not None and layer.bias is not None:
            layer.bias.copy_((layer.bias.to(device, torch.float) + diff_b).to(dtype or layer.bias.dtype))

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device) -> tuple[bool, float]:
        """Scale the weight change so its norm is at most ``max_norm`` (LyCORIS's rule); returns (scaled, norm)."""
        norm = self.diff_weight().to(device).norm()
        clamped = norm.clamp(min=max_norm / 2)
        ratio = (clamped.clamp(max=max_norm) / clamped).item()
        if ratio != 1:
            self.scale_weights(ratio)
        return ratio != 1, float(norm.item() * ratio)

    @abstractmethod
    def scale_weights(self, ratio: float) -> None:
        """Multiply ``ΔW`` by ``ratio`` through one linear factor."""


def _rank_alpha(lora_dim: int, alpha) -> float:
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float().item())
    return float(lora_dim) if alpha is None or alpha == 0 else float(alpha)


class LoConModule(WeightAdapter):
    """LyCORIS's LoRA/LoCon with DoRA or a Tucker middle (``lora_down``, ``lora_mid``, ``lora_up``, ``alpha``)."""

    algo = "locon"
    up_names = ("lora_up.weight",)

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, use_tucker=False, **kwargs):
        super().__init__(lora_name, org_module, multiplier, **kwargs)
        self.lora_dim = int(lora_dim)
        self.tucker = self.is_conv and use_tucker and org_module.kernel_size != (1, 1)
        if self.is_conv:
            i, o, k = org_module.in_channels, org_module.out_channels, org_module.kernel_size
            s, p = org_module.stride, org_module.padding
            if self.tucker:
                self.lora_down = nn.Conv2d(i, self.lora_dim, 1, bias=False)
                self.lora_mid = nn.Conv2d(self.lora_dim, self.lora_dim, k, s, p, bias=False)
            else:
                self.lora_down = nn.Conv2d(i, self.lora_dim, k, s, p, bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, o, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        alpha = _rank_alpha(self.lora_dim, alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))

    def diff_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight.flatten(1), self.lora_down.weight.flatten(1)
        if self.tucker:
            w = torch.einsum("m n ..., i m, n j -> i j ...", self.lora_mid.weight, up, down)
        else:
            w = up @ down
        return w.reshape(self.shape) * self.scale

    def scale_weights(self, ratio: float) -> None:
        self.lora_up.weight.mul_(math.sqrt(ratio))
        self.lora_down.weight.mul_(math.sqrt(ratio))


class LoHaModule(WeightAdapter):
    """LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / rank``; kxk convs may use Tucker cores ``hada_t1/t2``."""

    algo = "loha"

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, use_tucker=False, **kwargs):
        super().__init__(lora_name, org_module, multiplier, **kwargs)
        self.lora_dim = r = int(lora_dim)
        out_dim, in_dim, *k = self.shape
        self.tucker = bool(k) and use_tucker and any(s != 1 for s in k)
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(r, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(r, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(r, in_dim))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            flat_in = in_dim * math.prod(k)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, flat_in))
        alpha = _rank_alpha(r, alpha)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        nn.init.zeros_(self.hada_w2_a)

    def diff_weight(self) -> torch.Tensor:
        if self.tucker:
            rebuild = "i j ..., j r, i p -> p r ..."
            w1 = torch.einsum(rebuild, self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w2 = torch.einsum(rebuild, self.hada_t2, self.hada_w2_b, self.hada_w2_a)
        else:
            w1, w2 = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2).reshape(self.shape) * self.scale

    def scale_weights(self, ratio: float) -> None:
        self.hada_w1_a.mul_(ratio)


class LoKrModule(WeightAdapter):
    """LoKr: ``kron(w1, w2) * scale`` with either half full (``lokr_w1``/``lokr_w2``) or low rank (``_a @ _b``).

    Shapes come from LyCORIS's ``factorization(dim, factor)``; the scale is alpha / rank unless both halves are full,
    where it is 1 (and alpha is saved as the rank).
    """

    algo = "lokr"

    def __init__(
        self,
        lora_name,
        org_module,
        multiplier=1.0,
        lora_dim=4,
        alpha=1.0,
        use_tucker=False,
        factor=-1,
        decompose_both=False,
        full_matrix=False,
        **kwargs,
    ):
        super().__init__(lora_name, org_module, multiplier, **kwargs)
        self.lora_dim = r = int(lora_dim)
        out_dim, in_dim, *k = self.shape
        in_m, in_n = factorization(in_dim, int(factor))
        out_l, out_k = factorization(out_dim, int(factor))
        self.tucker = bool(k) and use_tucker and any(s != 1 for s in k)
        self.use_w1 = not (decompose_both and r < max(out_l, in_m) / 2 and not full_matrix)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_m))
        self.use_w2 = r >= max(out_k, in_n) / 2 or full_matrix
        if self.use_w2:
            self.tucker = False
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, out_k))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_n * math.prod(k)))
        alpha = _rank_alpha(r, alpha)
        if self.use_w1 and self.use_w2:
            alpha = float(r)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        if self.use_w2:
            nn.init.zeros_(self.lokr_w2)
        else:
            if self.tucker:
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2_b)
        if self.use_w1:
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))

    def diff_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.use_w2:
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1, w2.contiguous()).reshape(self.shape) * self.scale

    def scale_weights(self, ratio: float) -> None:
        (self.lokr_w1 if self.use_w1 else self.lokr_w1_a).mul_(ratio)


class FullModule(WeightAdapter):
    """Full fine-tuning of one layer as a difference: ``diff`` (and ``diff_b`` for a layer with a bias)."""

    algo = "full"

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=None, alpha=None, **kwargs):
        super().__init__(lora_name, org_module, multiplier, **kwargs)
        self.diff = nn.Parameter(torch.zeros(self.shape))
        self.diff_b = nn.Parameter(torch.zeros(org_module.bias.shape)) if org_module.bias is not None else None
        self.scale = 1.0

    def diff_weight(self) -> torch.Tensor:
        return self.diff

    def diff_bias(self) -> torch.Tensor | None:
        return self.diff_b

    def scale_weights(self, ratio: float) -> None:
        self.diff.mul_(ratio)


ADAPTERS: dict[str, type[WeightAdapter]] = {"locon": LoConModule, "loha": LoHaModule, "lokr": LoKrModule}
ADAPTERS["full"] = FullModule


def adapter_from_weights(
    lora_name: str, org_module: nn.Module, sd: dict[str, torch.Tensor], multiplier: float = 1.0
) -> WeightAdapter | None:
    """An adapter shaped like one module's tensors of a file (keys without the module name), or None for plain LoRA
    without DoRA or Tucker (networks.lora's own module) or an unknown layout."""
    alpha = sd.get("alpha")
    dora = sd.get("dora_scale")
    wd = {"weight_decompose": dora is not None}
    if dora is not None:
        wd["wd_on_out"] = not (dora.dim() > 1 and dora.shape[0] == 1 and dora.shape[1] != 1)
    if "hada_w1_a" in sd:
        tucker = "hada_t1" in sd
        return LoHaModule(lora_name, org_module, multiplier, sd["hada_w1_b"].shape[0], alpha, tucker, **wd)
    if "lokr_w1" in sd or "lokr_w1_a" in sd:
        return _lokr_from_weights(lora_name, org_module, sd, multiplier, wd)
    if "diff" in sd:
        return FullModule(lora_name, org_module, multiplier)
    if "lora_down.weight" in sd and (dora is not None or "lora_mid.weight" in sd):
        dim = sd["lora_down.weight"].shape[0]
        return LoConModule(lora_name, org_module, multiplier, dim, alpha, "lora_mid.weight" in sd, **wd)
    return None


def _lokr_from_weights(lora_name, org_module, sd, multiplier, wd) -> LoKrModule:
    """A LoKr module whose halves have exactly the file's shapes (whatever factor wrote them)."""
    module = LoKrModule(lora_name, org_module, multiplier, 1, 1.0, full_matrix=True, **wd)
    for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
        if hasattr(module, name):
            delattr(module, name)
        if name in sd:
            setattr(module, name, nn.Parameter(torch.zeros(sd[name].shape)))
    module.use_w1, module.use_w2, module.tucker = "lokr_w1" in sd, "lokr_w2" in sd, "lokr_t2" in sd
    low_rank = sd.get("lokr_w1_b", sd.get("lokr_w2_b"))
    rank = low_rank.shape[0] if low_rank is not None else 1
    alpha = _rank_alpha(rank, sd.get("alpha"))
    module.lora_dim = rank
    module.scale = 1.0 if module.use_w1 and module.use_w2 else alpha / rank
    module.alpha.fill_(float(rank) if module.use_w1 and module.use_w2 else alpha)
    return module
