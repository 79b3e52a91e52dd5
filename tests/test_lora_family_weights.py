"""library.lora_family.weights against the real lycoris-lora package (functional ΔW and its modules' forward,
DoRA included), a hand-computed OFT rotation, and sd-scripts' SVD/resize rules on hand-made singular values."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from library.errors import UserError
from library.lora_family import (
    ModuleWeights,
    delta_weight,
    lora_from_delta,
    merged_bias,
    merged_weight,
    parse_modules,
    rank_stats,
    svd_rank_for,
)
from library.lora_family.weights import lora_delta

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 on both sides: only summation order differs


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def module(algo: str, alpha: float | None = None, **tensors: torch.Tensor) -> ModuleWeights:
    return ModuleWeights("lora_unet_x", algo, {k.replace("__", "."): v for k, v in tensors.items()}, alpha)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_lora_and_locon_match_lycoris_functional():
    cases = [  # (down, up, mid)
        (rnd(4, 12), rnd(10, 4), None),
        (rnd(4, 6, 3, 3), rnd(8, 4, 1, 1), None),
        (rnd(4, 6, 1, 1), rnd(8, 4, 1, 1), rnd(4, 4, 3, 3)),
    ]
    for down, up, mid in cases:
        tensors = {"lora_down__weight": down, "lora_up__weight": up}
        if mid is not None:
            tensors["lora_mid__weight"] = mid
        got = delta_weight(module("lora", 3.0, **tensors))
        want = ly_locon.diff_weight(down, up, mid, gamma=3.0 / 4, backend="torch")
        torch.testing.assert_close(got, want, **TIGHT)
    # no alpha: scale 1
    down, up = rnd(4, 12), rnd(10, 4)
    torch.testing.assert_close(
        delta_weight(module("lora", None, lora_down__weight=down, lora_up__weight=up)), up @ down
    )


def test_loha_matches_lycoris_functional():
    r = 3
    linear = (rnd(r, 12), rnd(10, r), rnd(r, 12), rnd(10, r))  # w1d, w1u, w2d, w2u
    conv = (rnd(r, 6 * 9), rnd(8, r), rnd(r, 6 * 9), rnd(8, r))
    tucker = (rnd(r, 6), rnd(r, 8), rnd(r, 6), rnd(r, 8), rnd(r, r, 3, 3), rnd(r, r, 3, 3))
    for weights, shape in ((linear, (10, 12)), (conv, (8, 6, 3, 3)), (tucker, (8, 6, 3, 3))):
        w1d, w1u, w2d, w2u, *ts = weights
        tensors = dict(hada_w1_a=w1u, hada_w1_b=w1d, hada_w2_a=w2u, hada_w2_b=w2d)
        if ts:
            tensors.update(hada_t1=ts[0], hada_t2=ts[1])
        m = module("loha", 2.0, **tensors)
        got = delta_weight(m, shape=shape)
        want = ly_loha.diff_weight(w1d, w1u, w2d, w2u, *(ts or [None, None]), gamma=2.0 / r, backend="torch")
        assert got.shape == shape and m.fits(shape)
        torch.testing.assert_close(got, want.reshape(shape), **TIGHT)


def test_lokr_variants_match_lycoris_functional():
    r = 2
    cases = [  # (w1, w1a, w1b, w2, w2a, w2b, t2, layer shape)
        (rnd(2, 3), None, None, None, rnd(5, r), rnd(r, 4), None, (10, 12)),  # linear, w2 low rank
        (None, rnd(4, r), rnd(r, 3), rnd(3, 4), None, None, None, (12, 12)),  # decompose_both-style w1 pair
        (rnd(2, 3), None, None, rnd(5, 4), None, None, None, (10, 12)),  # both full: scale 1
        (rnd(2, 2), None, None, None, rnd(4, r), rnd(r, 3 * 9), None, (8, 6, 3, 3)),  # conv, flattened w2_b
        (rnd(2, 2), None, None, None, rnd(r, 4), rnd(r, 3), rnd(r, r, 3, 3), (8, 6, 3, 3)),  # conv Tucker
        (rnd(2, 2), None, None, rnd(4, 3, 3, 3), None, None, None, (8, 6, 3, 3)),  # conv, full w2 kernel
    ]
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    for *weights, shape in cases:
        tensors = {n: w for n, w in zip(names, weights) if w is not None}
        m = module("lokr", 1.5, **tensors)
        got = delta_weight(m, shape=shape)
        # lycoris.functional.lokr reads the rank off w2_a.shape[1], which in the Tucker layout (w2_a: rank x b) is b,
        # not the rank; its modules and ComfyUI divide by the rank, so the reference is rescaled for that case
        gamma = 1.5 * (weights[4].shape[1] / r if weights[6] is not None else 1.0)
        want = ly_lokr.diff_weight(*weights, gamma=gamma, backend="torch")
        assert m.fits(shape), (m.delta_shape(), shape)
        torch.testing.assert_close(got, want.reshape(shape), **TIGHT)
    both_full = module("lokr", 7.0, lokr_w1=rnd(2, 3), lokr_w2=rnd(5, 4))
    assert both_full.scale == 1.0 and both_full.rank is None


def _lycoris_module(cls, layer: torch.nn.Module, **kwargs):
    made = cls("lora_unet_x", layer, **kwargs)
    with torch.no_grad():
        for p in made.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() <= 2 and p.numel() < 16 else 0.0))
    return made


def _forward_with(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight.float(), layer.bias)
    return torch.nn.functional.conv2d(x, weight.float(), layer.bias, layer.stride, layer.padding)


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (LoConModule, {}),
        (LoConModule, {"use_tucker": True}),
        (LohaModule, {}),
        (LohaModule, {"use_tucker": True}),
        (LokrModule, {"factor": 4}),
        (LokrModule, {"factor": 2, "use_tucker": True}),
        (LokrModule, {"factor": 2, "decompose_both": True, "use_tucker": True}),
        (LokrModule, {"factor": 8, "decompose_both": True}),
    ],
    ids=["locon", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-both-tucker", "lokr-w1-pair"],
)
def test_merged_weight_matches_lycoris_module_forward(cls, kwargs, dora):
    """merged_weight(W, module, m) applied as a plain layer equals LyCORIS's own forward (rebuild mode) at the
    same multiplier, on a Linear and a 3x3 conv; float32 on both sides, tolerance 2e-5 relative."""
    layers = [torch.nn.Linear(32, 64), torch.nn.Conv2d(16, 32, 3, padding=1)]
    inputs = [torch.randn(3, 32), torch.randn(2, 16, 5, 5)]
    for layer, x in zip(layers, inputs):
        for multiplier in (1.0, 0.6):
            base = layer.weight.detach().clone()
            ly = _lycoris_module(
                cls, layer, multiplier=multiplier, lora_dim=2, alpha=1.5, weight_decompose=dora, **kwargs
            )
            parsed = parse_modules({f"lora_unet_x.{k}": v for k, v in ly.state_dict().items()})["lora_unet_x"]
            assert parsed.dora == dora
            assert ("lokr_w1_a" in parsed.tensors) == (kwargs.get("factor") == 8 and layer.weight.dim() == 2)
            ly.apply_to()
            want = layer(x)
            ly.restore()
            got = _forward_with(layer, merged_weight(base, parsed, multiplier), x)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_full_diff_and_bias():
    diff, diff_b = rnd(4, 3), rnd(4)
    m = module("full", None, diff=diff, diff_b=diff_b)
    base = rnd(4, 3)
    torch.testing.assert_close(merged_weight(base, m, 0.5), base + 0.5 * diff, **TIGHT)
    bias = rnd(4)
    torch.testing.assert_close(merged_bias(bias, m, 2.0), bias + 2 * diff_b, **TIGHT)
    assert merged_bias(bias, module("lora", 1.0, lora_down__weight=rnd(1, 3), lora_up__weight=rnd(4, 1))) is bias


def test_oft_rotation_by_hand():
    """One 2x2 block [[0, a], [0, 0]]: Q = [[0, a], [-a, 0]], R = (I+Q)(I-Q)^-1, merged = R^T W (sd-scripts)."""
    a = 0.5
    blocks = torch.tensor([[[0.0, a], [0.0, 0.0]]], dtype=torch.float64)
    m = ModuleWeights("oft_unet_x", "oft", {"oft_blocks": blocks}, alpha=10.0)
    rot = torch.tensor([[1 - a * a, 2 * a], [-2 * a, 1 - a * a]], dtype=torch.float64) / (1 + a * a)
    base = rnd(2, 3)
    torch.testing.assert_close(merged_weight(base, m), rot.T @ base, **TIGHT)
    torch.testing.assert_close(delta_weight(m, base), rot.T @ base - base, **TIGHT)
    half = 0.5 * (rot - torch.eye(2, dtype=torch.float64)) + torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(merged_weight(base, m, 0.5), half.T @ base, **TIGHT)
    # the constraint alpha * out_dim clamps the skew norm: alpha 0.1, out 2 -> |Q| = 0.2 (from sqrt(2) * 0.5)
    clamped = ModuleWeights("oft_unet_x", "oft", {"oft_blocks": blocks}, alpha=0.1)
    b = (0.2 + 1e-8) / (2**0.5 * a + 1e-8) * a
    rot_c = torch.tensor([[1 - b * b, 2 * b], [-2 * b, 1 - b * b]], dtype=torch.float64) / (1 + b * b)
    torch.testing.assert_close(merged_weight(base, clamped), rot_c.T @ base, **TIGHT)
    # conv: blocks act on output channels, every kernel position alike
    conv = rnd(2, 3, 3, 3)
    torch.testing.assert_close(merged_weight(conv, m), torch.einsum("nm,npij->mpij", rot, conv), **TIGHT)


def test_lora_from_delta_full_rank_is_exact():
    for delta in (rnd(10, 6), rnd(8, 4, 3, 3), rnd(8, 4, 1, 1)):
        for alpha in (None, 2.0):
            up, down, got_alpha = lora_from_delta(delta, rank=64, alpha=alpha)
            rank = down.shape[0]
            assert rank == min(delta.shape[0], delta[0].numel())
            assert got_alpha == (rank if alpha is None else alpha)
            assert up.shape[1:] == (rank, *([1] * (delta.dim() - 2))) and down.shape == (rank, *delta.shape[1:])
            rebuilt = lora_delta({"lora_up.weight": up, "lora_down.weight": down}) * (got_alpha / rank)
            assert ((rebuilt - delta).norm() / delta.norm()).item() < 1e-5


def test_lora_from_delta_truncates_and_clamps():
    delta = rnd(12, 9)
    up, down, alpha = lora_from_delta(delta, rank=3)
    s = torch.linalg.svdvals(delta)
    err = (up @ down - delta).norm()
    torch.testing.assert_close(err, s[3:].pow(2).sum().sqrt(), rtol=1e-9, atol=1e-9)  # Eckart-Young optimum
    up_c, down_c, _ = lora_from_delta(delta, rank=3, clamp_quantile=0.9)
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
    assert up_c.abs().max() <= high + 1e-12 and down_c.abs().max() <= high + 1e-12
    assert (up_c != up).any()


def test_svd_rank_for_follows_resize_lora_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    # sv_cumulative 0.7: cumulative [.5, .75, .875, 1] -> searchsorted 1 -> index 2 -> rank 3
    assert svd_rank_for(s, "sv_cumulative", 0.7, max_rank=8) == 3
    # sv_fro 0.9: squares' fractions [.727, .909, .955, 1] vs 0.81 -> searchsorted 1 -> index 2 -> rank 3
    assert svd_rank_for(s, "sv_fro", 0.9, max_rank=8) == 3
    # sv_ratio 3: singular values above 4/3 -> 2 -> rank 3
    assert svd_rank_for(s, "sv_ratio", 3, max_rank=8) == 3
    assert svd_rank_for(s, "sv_ratio", 1.5, max_rank=8) == 2  # one above 2.67 -> index 1 -> rank 2
    assert svd_rank_for(s, "sv_ratio", 100, max_rank=8) == 4  # index clamped to len - 1 = 3 -> rank 4
    assert svd_rank_for(s, "sv_fro", 0.9, max_rank=2) == 2  # --new_rank caps it
    assert svd_rank_for(s, None, None, max_rank=2) == 2
    assert svd_rank_for(torch.zeros(4), "sv_fro", 0.9, max_rank=8) == 1  # zero matrix
    with pytest.raises(UserError, match="--dynamic_method 'sv_bogus'"):
        svd_rank_for(s, "sv_bogus", 0.5, max_rank=8)


def test_sv_fro_keeps_the_requested_fraction():
    delta = rnd(40, 30)
    s = torch.linalg.svdvals(delta)
    for target in (0.5, 0.8, 0.95):
        rank = svd_rank_for(s, "sv_fro", target, max_rank=30)
        up, down, alpha = lora_from_delta(delta, rank)
        kept = (up @ down).norm() / delta.norm()
        assert kept >= target
        assert rank_stats(s, rank)[1] == pytest.approx(kept.item(), rel=1e-9)
        assert rank_stats(s, rank - 2)[1] < target  # sd-scripts keeps at most one more than needed
