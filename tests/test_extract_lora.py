"""networks/extract_lora_from_models.py on tiny models: a tuned model made from the base by perturbations of known
rank is reproduced by the extracted LoRA (merged, and applied at runtime through networks.lora), with sd-scripts'
clamping, text-encoder rule, rank caps, conv layers only with --conv_dim, metadata, SDXL names, and one-line
refusals of mismatched models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.cli import run_cli
from library.io import load_safetensors
from library.lora_family import delta_weight, merged_weight, parse_modules
from library.lora_tools.extract import extract_rank, target_layers
from library.models.family import family_named
from library.models.load import load_model
from library.models.tiny import make_tiny_model, tiny_model
from networks import lora
from networks.extract_lora_from_models import main

RANK = 2
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PROJ_IN = "lora_unet_up_blocks_3_attentions_1_proj_in"  # a 1x1 conv in SD1
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # 3x3
TE = "lora_te_text_model_encoder_layers_1_mlp_fc1"
SMALL = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # changed by less than --min_diff
PERTURBED = {LINEAR, PROJ_IN, CONV, TE, SMALL}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread is fastest on a shared 2-core machine."""


def low_rank(shape: torch.Size, rank: int, size: float, seed: int) -> torch.Tensor:
    """A rank-``rank`` change of the layer's flattened weight, largest |entry| exactly ``size``."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=g) @ torch.randn(
        rank, int(torch.tensor(shape[1:]).prod()), generator=g
    )
    return (flat * (size / flat.abs().max())).reshape(shape)


def perturb(components, changes: dict[str, tuple[float, int]]) -> None:
    layers = target_layers(components, conv=True)
    with torch.no_grad():
        for i, (name, (size, rank)) in enumerate(changes.items()):
            layers[name].weight += low_rank(layers[name].weight.shape, rank, size, seed=i)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD1 base, a tuned copy (5 layers changed at rank 2, one by less than --min_diff) and a copy whose
    text encoder changed by less than --min_diff, as diffusers folders."""
    root = tmp_path_factory.mktemp("extract")
    paths = {}
    for name, changes in (
        ("org", {}),
        ("tuned", {LINEAR: (0.2, RANK), PROJ_IN: (0.2, RANK), CONV: (0.2, RANK), TE: (0.2, RANK), SMALL: (0.004, 1)}),
        ("te_same", {LINEAR: (0.2, RANK), TE: (0.005, RANK)}),
    ):
        c = make_tiny_model()
        perturb(c, changes)
        paths[name] = root / name
        c.to_pipeline().save_pretrained(paths[name])
    return paths


def extract(models, out: Path, *flags: str, tuned: str = "tuned") -> dict[str, torch.Tensor]:
    main(["--model_org", str(models["org"]), "--model_tuned", str(models[tuned]), "--save_to", str(out), *flags])
    return load_safetensors(out)[0]


@pytest.fixture(scope="module")
def layers(models) -> dict[str, dict[str, torch.nn.Module]]:
    """The base's and the tuned model's target layers (conv included), loaded once, for reading only."""
    return {name: target_layers(load_model(models[name]), conv=True) for name in ("org", "tuned")}


@pytest.fixture(scope="module")
def exact(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "exact.safetensors"
    extract(models, out, "--dim", "4", "--conv_dim", "4", "--clamp_quantile", "1.0")
    return out


def test_extract_then_merge_reproduces_the_tuned_weights(layers, exact):
    """dim 4 >= the changes' rank 2, no clamping: every merged layer equals the tuned one (max abs error < 1e-5), and
    exactly the changed layers are in the file (the small UNet change too: sd-scripts applies --min_diff to the
    text encoder only)."""
    tensors, _ = load_safetensors(exact)
    modules = parse_modules(tensors)
    assert set(modules) == PERTURBED
    org, tuned = layers["org"], layers["tuned"]
    for name, module in modules.items():
        assert module.rank == 4 and module.alpha == 4.0
        merged = merged_weight(org[name].weight.detach(), module)
        assert (merged - tuned[name].weight).abs().max() < 1e-5, name
    assert tensors[f"{CONV}.lora_down.weight"].shape == (4, 16, 3, 3)
    assert tensors[f"{CONV}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert tensors[f"{PROJ_IN}.lora_down.weight"].shape[2:] == (1, 1)


def test_networks_lora_applies_it_to_the_outputs_of_the_tuned_model(models, exact):
    """The file loaded by networks.lora (create_network_from_weights + apply_to) on the base model gives the tuned
    model's text-encoder and UNet outputs (max abs difference < 1e-4)."""
    org, tuned = load_model(models["org"]), load_model(models["tuned"])
    network, _ = lora.create_network_from_weights(1.0, str(exact), None, org.text_encoder, org.unet)
    network.apply_to(org.text_encoder, org.unet)
    network.load_weights(str(exact))
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(0))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = [c.text_encoder(ids)[0] for c in (org, tuned)]
        assert (hidden[0] - hidden[1]).abs().max() < 1e-4
        out = [c.unet(latents, torch.tensor([500, 10]), hidden[1]).sample for c in (org, tuned)]
    assert (out[0] - out[1]).abs().max() < 1e-4


def sd_scripts_svd(delta: torch.Tensor, rank: int, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' extraction of one layer, written out independently: full SVD, U·diag(S), clamp at ± the quantile."""
    u, s, vh = torch.linalg.svd(delta.flatten(1))
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def test_default_clamp_is_sd_scripts_quantile_and_stays_close(models, layers, tmp_path):
    """--clamp_quantile 0.99 (default): the factors equal sd-scripts' clamped SVD up to the SVD's sign choice
    (products within 1e-5), and the merged ΔW stays within 25% (relative Frobenius) of the true change (clamping
    1% of the entries of these tiny factors costs up to 19% here; real layers have far more entries)."""
    tensors = extract(models, tmp_path / "clamped.safetensors", "--dim", "4", "--conv_dim", "4")
    org, tuned = layers["org"], layers["tuned"]
    for name, module in parse_modules(tensors).items():
        delta = (tuned[name].weight - org[name].weight).detach()
        up, down = sd_scripts_svd(delta, 4, 0.99)
        ours = delta_weight(module, shape=tuple(delta.shape))
        assert (ours - (up @ down).reshape(delta.shape)).abs().max() < 1e-5, name
        assert (ours - delta).norm() / delta.norm() < 0.25, name


def test_conv_layers_only_with_conv_dim_and_ranks_are_capped(models, tmp_path):
    """No --conv_dim: no 3x3 conv modules; --dim 64 is capped per layer; --no_metadata and fp16 saving."""
    tensors = extract(
        models, tmp_path / "plain.safetensors", "--dim", "64", "--no_metadata", "--save_precision", "fp16"
    )
    _, bare = load_safetensors(tmp_path / "plain.safetensors")
    assert not any(k.startswith("modelspec.") for k in bare) and bare["ss_network_args"] == "{}"
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    modules = parse_modules(tensors)
    assert set(modules) == PERTURBED - {CONV}  # 3x3 convs need --conv_dim, as sd-scripts
    assert modules[LINEAR].rank == 16 and modules[LINEAR].alpha == 16.0  # min(in, out) features: 16x16
    assert modules[PROJ_IN].rank == 16 and modules[TE].rank == 32 and modules[SMALL].rank == 32  # 64x32, 32x128
    assert extract_rank(torch.Size([64, 32]), 128, None) == 32
    assert extract_rank(torch.Size([16, 8, 3, 3]), 4, 100) == 8
    assert extract_rank(torch.Size([16, 8, 3, 3]), 4, None) == 4
    assert extract_rank(torch.Size([16, 8, 1, 1]), 4, 2) == 4  # 1x1 convs take --dim


def test_text_encoder_below_min_diff_is_left_out(models, tmp_path):
    """The text encoder changed by 0.005 <= --min_diff 0.01: no lora_te modules; with --min_diff 0.001 it is kept."""
    assert set(parse_modules(extract(models, tmp_path / "a.safetensors", tuned="te_same"))) == {LINEAR}
    kept = extract(models, tmp_path / "b.safetensors", "--min_diff", "0.001", tuned="te_same")
    assert set(parse_modules(kept)) == {LINEAR, TE}


def test_metadata_is_sd_scripts(exact):
    _, meta = load_safetensors(exact)
    assert {k: meta[k] for k in meta if k.startswith("ss_")} == {
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4.0",
        "ss_network_args": '{"conv_dim": "4", "conv_alpha": "4.0"}',
    }
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "exact"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["sshs_model_hash"]


def test_sdxl_extraction_uses_te1_te2_and_sgm_names(tmp_path):
    """tiny-sdxl base vs a tuned copy: lora_te1/lora_te2 and SGM UNet names, which networks.lora loads onto the
    base to give the tuned layers' outputs."""
    family = family_named("sdxl")
    tuned = tiny_model(family)
    layers = target_layers(tuned, conv=False)
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te2 = "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    unet = next(n for n in layers if n.startswith("lora_unet_output_blocks_") and n.endswith("attn2_to_k"))
    perturb(tuned, {te1: (0.2, 1), te2: (0.2, 2), unet: (0.2, 2)})
    tuned.to_pipeline().save_pretrained(tmp_path / "tuned")
    out = tmp_path / "xl.safetensors"
    main(
        [
            "--model_org",
            "tiny-sdxl",
            "--model_tuned",
            str(tmp_path / "tuned"),
            "--save_to",
            str(out),
            "--sdxl",
            "--clamp_quantile",
            "1",
        ]
    )
    tensors, meta = load_safetensors(out)
    assert set(parse_modules(tensors)) == {te1, te2, unet}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    base = load_model("tiny-sdxl")
    network, _ = lora.create_network_from_weights(1.0, str(out), None, base.text_encoders, base.unet)
    network.apply_to(base.text_encoders, base.unet)
    network.load_weights(str(out))
    base_layers = target_layers(base, conv=False)
    for name in (te1, te2, unet):
        x = torch.randn(3, layers[name].in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (base_layers[name](x) - layers[name](x)).abs().max() < 1e-4, name


@pytest.mark.parametrize(
    ("org", "tuned", "expected"),
    [
        ("tiny-sd1", "tiny-sdxl", "tiny-sd1 is SD1 but --model_tuned tiny-sdxl is SDXL"),
        ("tiny-sd1", "tiny-sd2", "tiny-sd1 is SD1 but --model_tuned tiny-sd2 is SD2"),
    ],
)
def test_models_of_different_architectures_are_one_line(org, tuned, expected, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert run_cli(main, ["--model_org", org, "--model_tuned", tuned, "--save_to", str(out)]) == 2
    assert error_lines(capsys) == [f"error: --model_org {expected}; extract needs two models of one architecture"]
    assert not out.exists()


def error_lines(capsys) -> list[str]:
    """stderr's ``error:`` lines (the log and progress bars aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error")]


def test_bad_flags_are_one_line(models, tmp_path, capsys):
    base = ["--model_org", "tiny-sd1", "--model_tuned", "tiny-sd1", "--save_to", str(tmp_path / "x.safetensors")]
    for flags, expected in (
        (["--sdxl"], "--sdxl: original model tiny-sd1 is SD1, not SDXL"),
        (["--v2", "--sdxl"], "--v2 and --sdxl cannot be given together"),
        (["--clamp_quantile", "1.5"], "--clamp_quantile 1.5: give a quantile in (0, 1]"),
        ([], "every target layer equals --model_org's"),
        (["--rank", "4"], "unknown argument(s): --rank"),
        (["--model_tuned", str(tmp_path / "nope")], "nope: model file or folder not found; check --model_tuned"),
    ):
        assert run_cli(main, base + flags) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and expected in err[0], err
