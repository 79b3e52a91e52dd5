"""networks/resize_lora.py: resizing a LoRA trained by train_network.py to its own rank is lossless, the dynamic
methods pick sd-scripts' ranks (checked on hand-made singular values and against sd-scripts' rules written out),
sv_fro keeps the asked fraction of each ΔW's Frobenius norm, --verbose prints sd-scripts' lines, metadata is
updated as sd-scripts does, and LoHa/DoRA files are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_network
from library.cli import run_cli
from library.io import load_safetensors, save_safetensors
from library.lora_family import delta_weight, parse_modules
from networks.resize_lora import main
from tests.training import network_args, write_frog_dataset

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SINGULAR = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread is fastest on a shared 2-core machine."""


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> Path:
    """A rank-4 (alpha 2) LoRA with 3x3 conv modules (conv_dim 4, alpha 1) trained 2 steps on the tiny SD1."""
    root = tmp_path_factory.mktemp("resize")
    data = write_frog_dataset(root / "data")
    extra = ["--max_train_steps", "2", "--network_module", "networks.lora", "--network_args", "conv_dim=4"]
    train_network.main(network_args(model_dir, data, root / "out", *extra, "conv_alpha=1"))
    return root / "out" / "lora.safetensors"


def resize(model: Path, out: Path, *flags: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    main(["--model", str(model), "--save_to", str(out), *flags])
    return load_safetensors(out)


def deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: delta_weight(m) for name, m in parse_modules(tensors).items()}


def test_resize_to_its_own_rank_is_lossless(trained, tmp_path):
    """Rank 4 -> 4: every module's scaled ΔW is equal within 1e-5 relative (Frobenius), alpha unchanged (the two
    zero modules become rank 1 as sd-scripts makes them), float32."""
    original, meta_in = load_safetensors(trained)
    resized, meta = resize(trained, tmp_path / "same.safetensors", "--new_rank", "4")
    before, after = deltas(original), deltas(resized)
    assert before.keys() == after.keys() and any(d.dim() == 4 and d.shape[2] == 3 for d in before.values())
    untrained = {name for name, delta in before.items() if not delta.any()}
    assert len(untrained) == 2  # the mid block's 1-token self-attention q/k get no gradient
    for name, delta in before.items():
        assert (after[name] - delta).norm() <= 1e-5 * delta.norm(), name
        rank = 1 if name in untrained else 4  # sd-scripts: a zero matrix gets rank 1, alpha scaled to match
        assert resized[f"{name}.alpha"].item() == original[f"{name}.alpha"].item() / 4 * rank
    assert {t.dtype for t in resized.values()} == {torch.float32}
    last = list(parse_modules(original))[-1]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == str(resized[f"{last}.alpha"].item())
    assert meta["ss_training_comment"] == f"dimension is resized from 4 to 4; {meta_in.get('ss_training_comment', '')}"
    assert meta["sshs_model_hash"] != meta_in["sshs_model_hash"]


def sd_scripts_fro_rank(delta: torch.Tensor, param: float, cap: int) -> int:
    """sd-scripts' index_sv_fro + rank_resize, written out (float32, as it computes)."""
    s = torch.linalg.svdvals(delta.flatten(1).float())
    if s[0] <= 1e-6:
        return 1
    squared = s.pow(2)
    index = int(torch.searchsorted(torch.cumsum(squared, 0) / float(squared.sum()), param**2)) + 1
    return min(max(1, min(index, len(s) - 1)) + 1, cap)


def test_sv_fro_keeps_the_fraction_and_picks_sd_scripts_ranks(trained, tmp_path):
    original, _ = load_safetensors(trained)
    resized, meta = resize(
        trained, tmp_path / "fro.safetensors", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"
    )
    before, after = deltas(original), deltas(resized)
    ranks = {m.name: m.rank for m in parse_modules(resized).values()}
    for name, delta in before.items():
        assert after[name].norm() >= 0.9 * delta.norm(), name  # the kept part of ΔW has >= 90% of its norm
        scale = original[f"{name}.alpha"].item() / 4
        assert ranks[name] == sd_scripts_fro_rank(delta / scale, 0.9, 4), name
        assert resized[f"{name}.alpha"].item() == pytest.approx(scale * ranks[name])
    assert len(set(ranks.values())) > 1  # the ranks did vary
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 4; ")


def test_new_conv_rank_applies_to_conv_modules(trained, tmp_path):
    resized, meta = resize(trained, tmp_path / "conv.safetensors", "--new_rank", "2", "--new_conv_rank", "1")
    modules = parse_modules(resized).values()
    assert {m.rank for m in modules if m.tensors["lora_down.weight"].dim() == 4} == {1}
    linear = [m for m in modules if m.tensors["lora_down.weight"].dim() == 2]
    assert {m.rank for m in linear if m.tensors["lora_up.weight"].any()} == {2}  # zero modules: rank 1
    assert meta["ss_training_comment"].startswith("dimension is resized from 4 to 2 (conv: 1); ")


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """One 16x16 rank-8 module (alpha 4) whose ΔW has exactly the singular values SINGULAR."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 8, generator=g, dtype=torch.float64))
    up, down = (u * torch.tensor(SINGULAR, dtype=torch.float64)).float(), v.T.float().contiguous()
    path = tmp_path_factory.mktemp("handmade") / "handmade.safetensors"
    tensors = {f"{NAME}.lora_up.weight": up, f"{NAME}.lora_down.weight": down, f"{NAME}.alpha": torch.tensor(4.0)}
    save_safetensors(tensors, path, {})
    return path


@pytest.mark.parametrize(
    ("method", "param", "cap", "rank"),
    [
        # sd-scripts keeps one more than its rules' index: S > 8/3 counts 2 -> rank 3
        ("sv_ratio", "3", "8", 3),
        ("sv_ratio", "10", "8", 5),  # S > 0.8: 4 -> 5
        ("sv_cumulative", "0.9", "8", 5),  # cumulative sums 0.50 0.75 0.88 0.94: first >= 0.9 at index 3 -> 3+1+1
        ("sv_cumulative", "0.5", "8", 2),  # 0.50196 >= 0.5 at index 0 -> 2
        ("sv_fro", "0.9", "8", 3),  # squared sums 0.750 0.9375 >= 0.81 at index 1 -> 3
        ("sv_fro", "0.999", "8", 6),  # 0.750 0.9375 0.984 0.9961 0.99985 >= 0.998 at index 4 -> 6
        ("sv_fro", "0.999", "4", 4),  # capped at --new_rank
    ],
)
def test_dynamic_ranks_follow_sd_scripts_rules(handmade, tmp_path, method, param, cap, rank):
    flags = ["--dynamic_method", method, "--dynamic_param", param, "--new_rank", cap]
    resized, _ = resize(handmade, tmp_path / "out.safetensors", *flags)
    module = parse_modules(resized)[NAME]
    assert module.rank == rank and module.alpha == 0.5 * rank
    kept = torch.linalg.svdvals(delta_weight(module))[:rank] / 0.5
    assert torch.allclose(kept, torch.tensor(SINGULAR[:rank]), rtol=1e-5)


def test_verbose_prints_sd_scripts_lines(handmade, tmp_path, capsys):
    resize(handmade, tmp_path / "v.safetensors", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "--verbose")
    out = capsys.readouterr().out
    line = f"{NAME:75} | sum(S) retained: 87.8%, fro retained: 99.2%, max(S) ratio: 4.0, dynamic | dim: 3, alpha: 1.5"
    assert out == f"\n{line}\n\nAverage Frobenius norm retention: 99.22% | std: 0.000\n"
    resize(handmade, tmp_path / "f.safetensors", "--new_rank", "2", "--verbose")
    line = f"{NAME:75} | sum(S) retained: 75.3%, fro retained: 96.8%, max(S) ratio: 2.0"
    assert capsys.readouterr().out == f"\n{line}\n\nAverage Frobenius norm retention: 96.83% | std: 0.000\n"


def test_other_algos_dora_and_bad_flags_are_one_line(handmade, tmp_path, capsys):
    loha = tmp_path / "loha.safetensors"
    w = torch.ones(4, 16)
    save_safetensors(
        {
            f"{NAME}.{k}": w if k.endswith("b") else w.T.contiguous()
            for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        },
        loha,
        {},
    )
    dora = tmp_path / "dora.safetensors"
    tensors, _ = load_safetensors(handmade)
    save_safetensors({**tensors, f"{NAME}.dora_scale": torch.ones(16, 1)}, dora, {})
    out = str(tmp_path / "o.safetensors")
    for argv, expected in (
        (["--model", str(loha), "--save_to", out], f"{loha}: module {NAME} is loha; resize_lora.py resizes LoRA/LoCon"),
        (["--model", str(dora), "--save_to", out], f"{dora}: module {NAME} is DoRA (dora_scale)"),
        (["--model", str(handmade), "--save_to", out, "--dynamic_method", "sv_fro"], "needs --dynamic_param"),
        (["--model", str(handmade), "--save_to", str(tmp_path / "o.bin")], "o.bin: give a .ckpt, .pt, .pth"),
        (["--save_to", out], "--model: give the LoRA file to resize"),
    ):
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert "Traceback" not in err and len(lines) == 1 and expected in lines[0], lines
    assert not Path(out).exists()


def test_tucker_locon_is_folded_into_a_plain_pair(tmp_path):
    """A LoCon 3x3 module with a Tucker core (lora_mid: sd-scripts' resize ignores it) resized to its rank keeps its
    ΔW within 1e-5 relative, as a plain kxk-down / 1x1-up pair."""
    g = torch.Generator().manual_seed(4)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    tucker = {
        f"{name}.lora_down.weight": torch.randn(3, 16, 1, 1, generator=g),
        f"{name}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g),
        f"{name}.lora_up.weight": torch.randn(32, 3, 1, 1, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }
    save_safetensors(tucker, tmp_path / "tucker.safetensors", {})
    resized, _ = resize(tmp_path / "tucker.safetensors", tmp_path / "plain.safetensors", "--new_rank", "3")
    assert resized[f"{name}.lora_down.weight"].shape == (3, 16, 3, 3) and f"{name}.lora_mid.weight" not in resized
    before, after = deltas(tucker)[name], deltas(resized)[name]
    assert (after - before).norm() <= 1e-5 * before.norm() and resized[f"{name}.alpha"].item() == 1.0
