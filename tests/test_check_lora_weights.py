"""networks/check_lora_weights.py: sd-scripts' per-tensor lines, and exactly the modules that are untrained (an
all-zero factor) or hold NaN/inf, for a real networks.lora file and hand-made LoHa, LoKr, full, DoRA, OFT and PEFT
keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.cli import run_cli
from networks import check_lora_weights
from networks.lora import create_network

ZEROED = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
BROKEN = "lora_te_text_model_encoder_layers_1_mlp_fc2"


def check(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = run_cli(check_lora_weights.main, list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


@pytest.fixture(scope="module")
def lora_file(sd1, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A networks.lora file of the tiny model with every up weight set, except one zeroed module and one with a NaN."""
    net = create_network(1.0, 4, 2, None, sd1.text_encoder, sd1.unet)
    generator = torch.Generator().manual_seed(0)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    for key in sd:
        if key.endswith("lora_up.weight"):
            sd[key] = torch.randn(sd[key].shape, generator=generator)
    sd[f"{ZEROED}.lora_up.weight"].zero_()
    sd[f"{BROKEN}.lora_down.weight"][0, 3] = float("nan")
    sd[f"{BROKEN}.lora_down.weight"][0, 0] = 0.0
    path = tmp_path_factory.mktemp("check") / "lora.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_reports_exactly_the_zeroed_and_the_nan_module(lora_file, capsys):
    path, sd = lora_file
    code, lines, _ = check(capsys, str(path))
    modules = {k.split(".")[0] for k in sd}
    weights = [k for k in sorted(sd) if not k.endswith(".alpha")]
    assert code == 0
    assert lines[0] == f"number of LoRA modules: {len(modules)}, weight tensors: {len(weights)}"
    assert [line.split(",")[0] for line in lines[1 : 1 + len(weights)]] == weights
    assert lines[1 + len(weights) :] == [
        f"untrained (lora: lora_up is all zero): {ZEROED}",
        f"non-finite (lora: NaN/inf in lora_down): {BROKEN}",
        f"checked {len(modules)} module(s) ({len(weights)} weight tensor(s)): 1 untrained (zero update), "
        "1 with NaN/inf",
    ]


def test_tensor_lines_are_sd_scripts_columns(lora_file, capsys):
    path, sd = lora_file
    _, lines, _ = check(capsys, str(path))
    width = sd[f"{ZEROED}.lora_up.weight"].shape[0]
    assert f"{ZEROED}.lora_up.weight,({width}-4),0,0" in lines
    down = sd[f"{ZEROED}.lora_down.weight"]
    mean, low = down.abs().mean().item(), down.abs().min().item()
    assert f"{ZEROED}.lora_down.weight,(4-{width}),{mean:.8g},{low:.8g}" in lines
    assert f"{BROKEN}.lora_down.weight,(4-64),nan,nan" in lines


def test_show_all_keys_adds_alpha(lora_file, capsys):
    path, sd = lora_file
    _, lines, _ = check(capsys, str(path), "-s")
    alphas = [k for k in sorted(sd) if k.endswith(".alpha")]
    assert lines[1] == f"number of all keys: {len(sd)}"
    assert f"{alphas[0]},(),2,2" in lines
    assert len([line for line in lines if line.startswith("lora_")]) == len(sd)


def test_every_network_type(tmp_path, capsys):
    """LoHa, LoKr, full, DoRA, OFT and PEFT modules: one trained and one untrained of each where it applies."""
    r = torch.randn
    sd = {
        "lora_unet_a.hada_w1_a": r(4, 2),
        "lora_unet_a.hada_w1_b": r(2, 4),
        "lora_unet_a.hada_w2_a": torch.zeros(4, 2),
        "lora_unet_a.hada_w2_b": r(2, 4),
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_unet_b.hada_w1_a": r(4, 2),
        "lora_unet_b.hada_w1_b": r(2, 4),
        "lora_unet_b.hada_w2_a": r(4, 2),
        "lora_unet_b.hada_w2_b": r(2, 4),
        "lora_unet_c.lokr_w1": r(2, 2),
        "lora_unet_c.lokr_w2_a": r(2, 1),
        "lora_unet_c.lokr_w2_b": torch.zeros(1, 2),
        "lora_unet_d.lokr_w1": r(2, 2),
        "lora_unet_d.lokr_w2": r(2, 2),
        "lora_unet_e.diff": torch.zeros(4, 4),
        "lora_unet_e.diff_b": torch.zeros(4),
        "lora_unet_f.diff": torch.zeros(4, 4),
        "lora_unet_f.diff_b": torch.ones(4),
        "lora_unet_g.lora_down.weight": r(2, 4),
        "lora_unet_g.lora_up.weight": r(4, 2),
        "lora_unet_g.dora_scale": torch.tensor([[1.0, float("inf"), 1.0, 1.0]]),
        "oft_unet_h.oft_blocks": torch.ones(2, 3, 3),
        "oft_unet_h.alpha": torch.tensor(1e-3),
        "oft_unet_i.oft_blocks": torch.triu(torch.ones(2, 3, 3)),
        "unet.up.to_q.lora_A.weight": r(2, 4),
        "unet.up.to_q.lora_B.weight": torch.zeros(4, 2),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    _, lines, _ = check(capsys, str(path))
    assert lines[0] == "number of LoRA modules: 10, weight tensors: 24"
    assert "lora_unet_g.dora_scale,(1-4),inf,1" in lines
    assert lines[25:] == [
        "untrained (loha: hada_w2_a is all zero): lora_unet_a",
        "untrained (lokr: lokr_w2_b is all zero): lora_unet_c",
        "untrained (full: diff and diff_b all zero): lora_unet_e",
        "untrained (oft: oft_blocks has no skew-symmetric part (identity rotation)): oft_unet_h",
        "untrained (lora: lora_B is all zero): unet.up.to_q",
        "non-finite (lora: NaN/inf in dora_scale): lora_unet_g",
        "checked 10 module(s) (24 weight tensor(s)): 5 untrained (zero update), 1 with NaN/inf",
    ]


def test_a_file_without_lora_keys_is_one_line(sd1, tmp_path, capsys):
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in list(sd1.unet.state_dict().items())[:20]}, str(path))
    code, lines, err = check(capsys, str(path))
    assert code == 2 and lines == []
    assert err.splitlines()[-1] == (
        f"error: {path}: no LoRA-family weights (lora_up/lora_down, hada_*, lokr_*, diff, oft_blocks) among its 20 "
        "key(s); is it a LoRA file?"
    )


def test_a_missing_file_is_one_line(tmp_path, capsys):
    code, _, err = check(capsys, str(tmp_path / "nope.safetensors"))
    assert code == 2 and err.splitlines()[-1] == f"error: {tmp_path / 'nope.safetensors'}: file not found"
