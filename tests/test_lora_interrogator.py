"""networks/lora_interrogator.py: each listed token's difference equals a direct computation with the LoRA merged
into a copy of the text encoder by hand, the list is the top 100 by that difference, and bad LoRAs are one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.cli import run_cli
from library.models.load import load_model
from networks import lora_interrogator
from networks.lora import create_network, text_encoder_module_path

LINE = re.compile(r"^\[\s*(\d+)\]: +(\d+) (.*): (\d+\.\d{5})$")


@pytest.fixture(scope="module")
def te_lora(model_dir, tmp_path_factory, one_torch_thread) -> tuple[Path, dict[str, torch.Tensor]]:
    """A rank-4, alpha-2 LoRA on the tiny model with random (seeded) text-encoder up weights and zero UNet ones."""
    c = load_model(model_dir)
    net = create_network(1.0, 4, 2, None, c.text_encoder, c.unet)
    generator = torch.Generator().manual_seed(1)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    for key in sd:
        if key.startswith("lora_te_") and key.endswith("lora_up.weight"):
            sd[key] = torch.randn(sd[key].shape, generator=generator) * 0.3
    path = tmp_path_factory.mktemp("interrogate") / "te_lora.safetensors"
    save_file(sd, str(path))
    return path, sd


def merged_by_hand(text_encoder: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The text encoder with W += alpha / dim * up @ down for every lora_te_ module of ``sd``."""
    names = {f"lora_te_{text_encoder_module_path(n).replace('.', '_')}": m for n, m in text_encoder.named_modules()}
    merged = 0
    with torch.no_grad():
        for key, up in sd.items():
            if key.startswith("lora_te_") and key.endswith(".lora_up.weight"):
                name = key.split(".")[0]
                down, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.alpha"]
                names[name].weight += float(alpha) / down.shape[0] * (up @ down)
                merged += 1
    assert merged == 24
    return text_encoder


@torch.no_grad()
def direct_differences(model_dir: Path, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean |merged - base| text-encoder output per token id over <bos> id <eos>, computed without the tool."""
    base = load_model(model_dir)
    merged = merged_by_hand(load_model(model_dir).text_encoder, sd)
    tokenizer = base.tokenizer
    ids = torch.arange(max(tokenizer.all_special_ids) + 1)
    rows = torch.stack(
        [torch.full_like(ids, tokenizer.bos_token_id), ids, torch.full_like(ids, tokenizer.eos_token_id)]
    )
    rows = rows.T
    out = []
    for chunk in rows.split(8192):
        out.append((merged(chunk)[0] - base.text_encoder(chunk)[0]).abs().mean((1, 2)))
    return torch.cat(out)


def test_listed_differences_and_ranking_match_a_direct_computation(model_dir, te_lora, capsys):
    path, sd = te_lora
    code = run_cli(lora_interrogator.main, ["--sd_model", str(model_dir), "--model", str(path), "--batch_size", "4096"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "top 100:" and len(lines) == 101
    rows = [LINE.match(line) for line in lines[1:]]
    assert all(rows), lines
    ranks = [int(m.group(1)) for m in rows]
    ids = [int(m.group(2)) for m in rows]
    listed = [float(m.group(4)) for m in rows]
    assert ranks == list(range(100))
    direct = direct_differences(model_dir, sd)
    assert len(direct) == 49408
    for token, value in zip(ids, listed):
        assert abs(value - float(direct[token])) < 2e-5, token
    assert listed == sorted(listed, reverse=True)
    rest = direct.clone()
    rest[ids] = -1
    assert min(listed) >= float(rest.max()) - 2e-5  # nothing left out moved more than the last one listed
    assert len(set(ids)) == 100 and float(direct.max()) > 1.2 * float(direct.median())  # tokens really differ
    tokenizer = load_model(model_dir).tokenizer
    assert rows[0].group(3) == f"{tokenizer.decode([ids[0]]):<20s}"
    assert "compared 49408 tokens in" in err and "49408 changed" in err


def _unet_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith("lora_unet_")}


def _sdxl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("lora_te_", "lora_te1_"): v for k, v in sd.items()}


def _other_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("layers_0_", "layers_9_"): v for k, v in sd.items()}


def _wider(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {**sd, f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(1024, 4)}


def _nan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    return {**sd, key: torch.full_like(sd[key], float("nan"))}


@pytest.mark.parametrize(
    "change, message",
    [
        (_unet_only, "this LoRA has no text-encoder (lora_te_) modules, so there is nothing to interrogate"),
        (_sdxl, "an SDXL LoRA (lora_te1_/lora_te2_ keys); lora_interrogator.py handles SD 1.x/2.x LoRAs"),
        (_nan, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight holds NaN/inf (1 tensor(s))"),
        (_other_model, "6 text-encoder module(s) are not in {model}'s text encoder (e.g. lora_te_text_model_encoder"),
        (_wider, "its text-encoder weights do not fit {model} (size mismatch for"),
    ],
)
def test_unusable_loras_are_one_line(model_dir, te_lora, tmp_path, capsys, change, message):
    path = tmp_path / "bad.safetensors"
    save_file(change(te_lora[1]), str(path))
    code = run_cli(lora_interrogator.main, ["--sd_model", str(model_dir), "--model", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"error: {path}: {message.format(model=model_dir)}")


def test_missing_flags_are_one_line(capsys):
    assert run_cli(lora_interrogator.main, ["--sd_model", "tiny-sd1"]) == 2
    assert capsys.readouterr().err == "error: --model is required: the LoRA file\n"
    assert run_cli(lora_interrogator.main, ["--model", "x.safetensors", "--clip_skip", "0"]) == 2
    assert capsys.readouterr().err == "error: --sd_model is required: the base model\n"
