"""networks/svd_merge_lora.py: the summed ΔW of several files re-factored by SVD. Rank large enough (with
--clamp_quantile 1): the sum of the files' ΔW within 1e-5 of its largest value; a smaller rank: the best
approximation of that rank (Eckart–Young: the truncated SVD of the sum, 1e-5); LoHa/LoKr files with flattened conv
kernels come back in the layer's shape; --lbws scales blocks as sd-scripts; DoRA is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import networks.lora as lora
from library.cli import run_cli
from library.lora_family import delta_weight, parse_modules, read_lora_file, write_lora_file
from library.lora_tools import merge
from library.models.family import family_named
from library.models.tiny import tiny_model
from networks import svd_merge_lora

META = {"ss_base_model_version": "sd_v1", "ss_v2": "False"}
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.fixture(scope="module")
def two_loras(one_torch_thread, tmp_path_factory) -> tuple[Path, Path]:
    """Two rank-4 networks.lora files (conv rank 4 too) with non-zero random weights."""
    folder = tmp_path_factory.mktemp("svd")
    paths = []
    for seed, alpha in ((1, 2.0), (2, 4.0)):
        c = tiny_model(family_named("sd1"))
        net = lora.create_network(1.0, 4, alpha, c.vae, c.text_encoder, c.unet, conv_dim="4", conv_alpha="1")
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        path = folder / f"l{seed}.safetensors"
        net.save_weights(str(path), torch.float32, dict(META))
        paths.append(path)
    return paths[0], paths[1]


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {n: delta_weight(m) for n, m in parse_modules(read_lora_file(path).tensors).items()}


def svd_merge(tmp_path: Path, models, ratios, *extra: str) -> Path:
    out = tmp_path / "svd.safetensors"
    argv = ["--models", *map(str, models), "--ratios", *map(str, ratios), "--save_to", str(out), *extra]
    assert run_cli(svd_merge_lora.main, argv) == 0
    return out


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert float((got - want).abs().max() / want.abs().max()) < tol


def test_full_rank_equals_the_sum_of_deltas(two_loras, tmp_path, capsys):
    a, b = two_loras
    out = svd_merge(tmp_path, [a, b], [0.8, -0.5], "--new_rank", "8", "--clamp_quantile", "1")
    assert f"wrote {out}" in capsys.readouterr().out
    da, db, got = deltas(a), deltas(b), deltas(out)
    assert set(got) == set(da)
    for name, delta in got.items():
        close(delta, 0.8 * da[name] - 0.5 * db[name])
    file = read_lora_file(out)
    assert file.tensors[f"{ATTN}.lora_down.weight"].shape[0] == 8 and float(file.tensors[f"{ATTN}.alpha"]) == 8.0
    assert file.metadata["ss_network_dim"] == "8" and file.metadata["ss_network_alpha"] == "8"
    assert json.loads(file.metadata["ss_network_args"]) == {"conv_dim": 8, "conv_alpha": 8}
    assert file.metadata["modelspec.merged_from"] == "l1, l2"
    c = tiny_model(family_named("sd1"))
    net, _ = lora.create_network_from_weights(1.0, str(out), c.vae, c.text_encoder, c.unet)
    net.load_weights(str(out))  # loads back in networks.lora


def test_small_rank_is_the_best_approximation(two_loras, tmp_path):
    a, b = two_loras
    out = svd_merge(tmp_path, [a, b], [1.0, 1.0], "--new_rank", "2", "--new_conv_rank", "3", "--clamp_quantile", "1")
    da, db, got = deltas(a), deltas(b), deltas(out)
    for name in (ATTN, CONV):
        total = (da[name] + db[name]).flatten(1).double()
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        k = 3 if name == CONV else 2
        best = (u[:, :k] * s[:k]) @ vh[:k]
        close(got[name].flatten(1).double(), best)
        residual = torch.linalg.matrix_norm(total - got[name].flatten(1).double())
        assert abs(float(residual) - float(s[k:].square().sum().sqrt())) < 1e-5 * float(s[0])
    # sd-scripts' default clamp at the 0.99 quantile changes the factors
    clamped = deltas(svd_merge(tmp_path, [a, b], [1.0, 1.0], "--new_rank", "2", "--new_conv_rank", "3"))
    assert not torch.allclose(clamped[ATTN], got[ATTN], rtol=1e-3, atol=1e-4)


def loha_conv_file(path: Path) -> Path:
    """LoHa modules stored as LyCORIS stores them: a 3x3 conv and SD1's 1x1-conv proj_in flattened into 2-D."""
    torch.manual_seed(4)
    t = {}
    for name, inputs in ((CONV, 16 * 9), (PROJ, 16)):
        for half in ("w1", "w2"):
            t[f"{name}.hada_{half}_a"] = torch.randn(16, 2) * 0.5
            t[f"{name}.hada_{half}_b"] = torch.randn(2, inputs) * 0.5
        t[f"{name}.alpha"] = torch.tensor(1.0)
    write_lora_file(path, t, META)
    return path


def test_loha_and_lora_sum_in_layer_shapes(two_loras, tmp_path):
    a, _ = two_loras
    loha = loha_conv_file(tmp_path / "loha.safetensors")
    out = svd_merge(tmp_path, [a, loha], [1.0, 0.5], "--new_rank", "16", "--clamp_quantile", "1")
    da, dl, got = deltas(a), deltas(loha), deltas(out)
    tensors = read_lora_file(out).tensors
    assert tensors[f"{CONV}.lora_down.weight"].shape == (16, 16, 3, 3)
    assert tensors[f"{PROJ}.lora_down.weight"].shape == (16, 16, 1, 1)
    for name in (CONV, PROJ):
        close(got[name], da[name] + 0.5 * dl[name].reshape(da[name].shape))
    # the whole file fits the model's layers: it loads in networks.lora
    c = tiny_model(family_named("sd1"))
    net, _ = lora.create_network_from_weights(1.0, str(out), c.vae, c.text_encoder, c.unet)
    net.load_weights(str(out))


def error_of(capsys, argv: list[str]) -> str:
    assert run_cli(svd_merge_lora.main, argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_refusals(two_loras, tmp_path, capsys):
    a, _ = two_loras
    dora = tmp_path / "dora.safetensors"
    t = {f"{ATTN}.lora_down.weight": torch.randn(2, 16), f"{ATTN}.lora_up.weight": torch.randn(16, 2)}
    write_lora_file(dora, {**t, f"{ATTN}.dora_scale": torch.ones(16, 1)})
    out = str(tmp_path / "o.safetensors")
    err = error_of(capsys, ["--models", str(dora), "--ratios", "1", "--save_to", out])
    assert "dora.safetensors" in err and "lora+dora" in err and "--sd_model" in err
    lbws = "[1,1,1,1,1,1,1,1,1,1,1,1,1]"
    err = error_of(capsys, ["--models", str(a), "--ratios", "1", "--lbws", lbws, "--save_to", out])
    assert "--lbws" in err and "13 values" in err
    no_base = tmp_path / "nobase.safetensors"
    write_lora_file(no_base, read_lora_file(loha_conv_file(tmp_path / "l.safetensors")).tensors)  # no metadata
    err = error_of(capsys, ["--models", str(no_base), "--ratios", "1", "--save_to", out])
    assert PROJ in err and "--sd_model" in err
    assert not Path(out).exists()


def test_lbws_scale_blocks_as_sd_scripts(two_loras, tmp_path):
    a, _ = two_loras
    # 26 slots: BASE (text encoder) 0.5, IN00-IN11 0, MID 1, OUT00-OUT11 2
    lbws = json.dumps([0.5] + [0] * 12 + [1] + [2] * 12)
    out = svd_merge(tmp_path, [a], [1.0], "--new_rank", "16", "--clamp_quantile", "1", "--lbws", lbws)
    da, got = deltas(a), deltas(out)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    mid = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    up = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    close(got[te], 0.5 * da[te])
    close(got[mid], da[mid])
    close(got[up], 2 * da[up])
    assert float(got[ATTN].abs().max()) == 0.0
    # slot numbers as sd-scripts' get_lbw_block_index; a 12-value list sets BASE, IN04, IN05, IN07, IN08, MID, OUT00-05
    names = [ATTN, "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv", up, mid]
    assert [merge.lbw_block_index(n, False) for n in names] == [2, 4, 16, 17, 13]
    sgm = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_8_0_skip"]
    assert [merge.lbw_block_index(n, True) for n in sgm] == [5, 13, 22]
    weights = merge.parse_lbws([json.dumps(list(range(2, 14)))], 1)[0]
    assert [i for i, w in enumerate(weights) if w != 1] == [0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19]
