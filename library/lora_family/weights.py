"""The math of LoRA-family modules: ΔW per algorithm (LyCORIS's rules and scales), merged weights (DoRA, OFT),
and the SVD helpers extract/resize tools use (sd-scripts' rules).

Everything is computed in float32, or float64 when the inputs are, and returned in that precision.
"""

from __future__ import annotations

import math

import torch

from library.errors import UserError
from library.lora_family.layout import ModuleWeights

MIN_SV = 1e-6
"""sd-scripts' resize_lora.py: a module whose largest singular value is at most this is a zero matrix (rank 1)."""
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def _work(tensors: dict[str, torch.Tensor], base: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    dtypes = [t.dtype for t in tensors.values()] + ([base.dtype] if base is not None else [])
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    return {k: v.to(dtype) for k, v in tensors.items()}


def lora_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoRA/LoCon ΔW: ``up @ down`` (conv: kxk down, 1x1 up), or the Tucker rebuild with ``lora_mid``."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    if "lora_mid.weight" in t:
        return torch.einsum("m n ..., i m, n j -> i j ...", t["lora_mid.weight"], up.flatten(1), down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoHa ΔW: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, each half a Tucker rebuild when ``hada_t1/t2`` exist
    (conv kernels otherwise come flattened into the second axis)."""
    if "hada_t1" in t:
        first = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        second = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return first * second
    shape = (t["hada_w1_a"].shape[0], *t["hada_w1_b"].shape[1:])
    first = t["hada_w1_a"].flatten(1) @ t["hada_w1_b"].flatten(1)
    second = t["hada_w2_a"].flatten(1) @ t["hada_w2_b"].flatten(1)
    return (first * second).reshape(shape)


def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoKr ΔW: ``kron(w1, w2)`` with each factor full or a low-rank pair, ``w2`` a Tucker rebuild with
    ``lokr_t2``; conv kernels ride on ``w2`` (flattened into its second axis for a plain pair)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)).reshape(t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous())


def oft_rotation(blocks: torch.Tensor, alpha: float | None, out_dim: int, multiplier: float = 1.0) -> torch.Tensor:
    """sd-scripts' OFT block rotations: Cayley transform of the skew part of ``oft_blocks``, its norm clamped to
    ``alpha * out_dim``, interpolated from the identity by ``multiplier``."""
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    if alpha is not None:
        q = q * ((torch.clamp(norm, max=alpha * out_dim) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[1], dtype=q.dtype).expand_as(q)
    rotation = (eye + q) @ torch.linalg.inv(eye - q)
    return multiplier * (rotation - eye) + eye


def _oft_merged(base: torch.Tensor, module: ModuleWeights, t: dict[str, torch.Tensor], multiplier: float):
    blocks = t["oft_blocks"]
    rotation = oft_rotation(blocks, module.alpha, base.shape[0], multiplier)
    weight = base.reshape(blocks.shape[0], blocks.shape[1], -1)
    return torch.einsum("k n m, k n ... -> k m ...", rotation, weight).reshape(base.shape)


def delta_weight(
    module: ModuleWeights, base: torch.Tensor | None = None, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The scaled ΔW of a module (alpha / rank as LyCORIS), in the layer's weight shape (``base.shape`` or
    ``shape``; otherwise the shape it is rebuilt in). DoRA modules give their additive ΔW before the weight
    decomposition and OFT needs ``base`` (ΔW = R·W − W); use ``merged_weight`` for what a module makes of a layer."""
    t = _work(module.tensors, base)
    if module.algo == "oft":
        if base is None:
            raise ValueError(f"{module.name}: an OFT delta needs the base weight")
        work = base.to(next(iter(t.values())).dtype)
        return _oft_merged(work, module, t, 1.0) - work
    if module.algo == "lora":
        delta = lora_delta(t)
    elif module.algo == "loha":
        delta = loha_delta(t)
    elif module.algo == "lokr":
        delta = lokr_delta(t)
    elif module.algo == "full":
        delta = t["diff"]
    else:
        raise ValueError(f"{module.name}: unknown algorithm {module.algo}")
    target = tuple(base.shape) if base is not None else shape
    if module.scale != 1.0:
        delta = delta * module.scale
    if target is not None:
        if delta.numel() != math.prod(target):
            raise UserError(f"{module.name}: ΔW {tuple(delta.shape)} does not fit the layer's weight {target}")
        delta = delta.reshape(target)
    return delta


def weight_decompose(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """DoRA as LyCORIS: ``W · (multiplier · (m / ‖W‖ − 1) + 1)`` with the norm per output row (``dora_scale``
    shaped (out, 1, …)) or per input column ((1, in, …)), plus float eps."""
    on_out = dora_scale.shape[0] == weight.shape[0] and (dora_scale.shape[0] != 1 or dora_scale.numel() == 1)
    ones = [1] * (weight.dim() - 1)
    if on_out:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
        magnitude = dora_scale.reshape(weight.shape[0], *ones)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(weight.shape[1], *ones).transpose(0, 1)
        magnitude = dora_scale.reshape(1, weight.shape[1], *ones[1:])
    scale = magnitude.to(weight.dtype) / (norm + torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale


def merged_weight(base: torch.Tensor, module: ModuleWeights, multiplier: float = 1.0) -> torch.Tensor:
    """The layer weight with the module merged: ``base + multiplier·ΔW``; DoRA: the decomposition of
    ``base + ΔW`` with the multiplier interpolating its scale as LyCORIS does (so multiplier 0 still gives
    ``base + ΔW``); OFT: sd-scripts' block rotation of ``base``. Returned in the working precision."""
    t = _work(module.tensors, base)
    work = base.to(next(iter(t.values())).dtype)
    if module.algo == "oft":
        return _oft_merged(work, module, t, multiplier)
    delta = delta_weight(module, work)
    if module.dora:
        return weight_decompose(work + delta, t["dora_scale"], multiplier)
    return work + multiplier * delta


def merged_bias(base: torch.Tensor | None, module: ModuleWeights, multiplier: float = 1.0) -> torch.Tensor | None:
    """The layer bias with a full module's ``diff_b`` added (other modules leave the bias alone)."""
    diff_b = module.tensors.get("diff_b")
    if diff_b is None:
        return base
    delta = multiplier * diff_b.to(torch.float64 if diff_b.dtype == torch.float64 else torch.float32)
    return delta if base is None else base.to(delta.dtype) + delta


def lora_from_delta(
    delta: torch.Tensor, rank: int, clamp_quantile: float | None = None, alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, alpha) of a rank-``rank`` LoRA whose scaled ΔW best approximates ``delta`` (truncated SVD, as
    sd-scripts' extract/resize: conv kernels flattened, kxk down with 1x1 up; rank capped at the matrix's rank).

    ``alpha`` defaults to the rank (scale 1); another alpha folds rank/alpha into ``up``. ``clamp_quantile``
    clamps both factors to ± that quantile of their values, as extract_lora_from_models.py does."""
    matrix = delta.flatten(1).to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    rank = max(1, min(int(rank), *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    alpha = float(rank) if alpha is None else float(alpha)
    if alpha != rank:
        up = up * (rank / alpha)
    if delta.dim() > 2:
        up = up.reshape(delta.shape[0], rank, *([1] * (delta.dim() - 2)))
        down = down.reshape(rank, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), alpha


def svd_rank_for(singular_values: torch.Tensor, method: str | None, param: float | None, max_rank: int) -> int:
    """The rank sd-scripts' resize_lora.py keeps for these singular values (descending): ``sv_ratio`` (largest /
    kept ≤ param), ``sv_fro`` (Frobenius fraction param), ``sv_cumulative`` (sum fraction param), None: max_rank;
    a zero matrix gets 1 and the result is capped at ``max_rank``, with sd-scripts' index clamping."""
    s = singular_values.detach().double().flatten()
    if method is None:
        rank = max_rank
    elif method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
    else:
        if param is None:
            raise UserError(f"--dynamic_method {method} needs --dynamic_param")
        if method == "sv_ratio":
            index = int(torch.sum(s > s[0] / param).item())
        elif method == "sv_cumulative":
            index = int(torch.searchsorted(torch.cumsum(s, 0) / float(s.sum()), param)) + 1
        else:
            squared = s.pow(2)
            index = int(torch.searchsorted(torch.cumsum(squared, 0) / float(squared.sum()), param**2)) + 1
        rank = max(1, min(index, len(s) - 1)) + 1
    if s[0] <= MIN_SV:
        return 1
    return min(rank, max_rank)


def rank_stats(singular_values: torch.Tensor, rank: int) -> tuple[float, float, float]:
    """(sum retained, Frobenius fraction retained, largest/smallest kept singular value) at ``rank``, the
    figures resize_lora.py's ``--verbose`` prints."""
    s = singular_values.detach().double().flatten()
    fro = float(s[:rank].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    return float(s[:rank].abs().sum() / s.abs().sum()), fro, float(s[0] / s[rank - 1])
