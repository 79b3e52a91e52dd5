"""networks/merge_lora.py: LoRA-family files merged into the tiny SD1 model give the same UNet and text-encoder
outputs as the network applied at runtime (networks.lora for LoRA/LoCon, the real lycoris-lora package for its LoHa,
LoKr and DoRA files), and LoRA files merged into one LoRA (sd-scripts' weighted sum; --concat: exactly the summed ΔW).

Tolerances: merged vs runtime outputs within 1e-5 of the output's largest magnitude (float32); --concat ΔW within
1e-6; sd-scripts' weighted-sum factors exactly (1e-7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import networks.lora as lora
from library.cli import run_cli
from library.lora_family import delta_weight, parse_modules, read_lora_file, write_lora_file
from library.models.family import family_named
from library.models.load import load_model
from library.models.tiny import tiny_model
from networks import merge_lora

META = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "False"}


def inputs():
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    return x, torch.tensor([10, 700]), ctx, torch.randint(0, 1000, (2, 77), generator=g)


def outputs(c) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        return c.unet(x, t, ctx).sample, c.text_encoder(ids)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_outputs(merged, runtime, base=None, tol=1e-5) -> None:
    for got, want, before in zip(outputs(merged), runtime, base or (None, None)):
        assert rel(got, want) < tol, rel(got, want)
        if before is not None:
            assert rel(before, want) > 1e-3  # the network changes the output: the comparison means something


def randomise(net: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale)


def our_lora(path: Path, seed: int, dim: int = 4, alpha: float = 2.0, family: str = "sd1", **args) -> Path:
    """A networks.lora file with non-zero random weights."""
    c = tiny_model(family_named(family))
    net = lora.create_network(1.0, dim, alpha, c.vae, c.text_encoder, c.unet, **args)
    randomise(net, seed)
    net.save_weights(str(path), torch.float32, dict(META))
    return path


@pytest.fixture(scope="module")
def base_outputs(one_torch_thread):
    return outputs(load_model("tiny-sd1"))


def merge(tmp_path: Path, models: list[Path], ratios: list[float], *extra: str, name="merged.safetensors") -> Path:
    out = tmp_path / name
    argv = ["--sd_model", "tiny-sd1", "--models", *map(str, models), "--ratios", *map(str, ratios)]
    assert run_cli(merge_lora.main, [*argv, "--save_to", str(out), *extra]) == 0
    return out


def test_lora_and_locon_into_model_equal_runtime(base_outputs, tmp_path, capsys):
    a = our_lora(tmp_path / "a.safetensors", 1, conv_dim="4", conv_alpha="1")
    b = our_lora(tmp_path / "b.safetensors", 2, dim=8, alpha=8.0)
    runtime = tiny_model(family_named("sd1"))
    for path, ratio in ((a, 0.7), (b, -0.4)):
        net, _ = lora.create_network_from_weights(ratio, str(path), runtime.vae, runtime.text_encoder, runtime.unet)
        net.load_weights(str(path))
        net.apply_to(runtime.text_encoder, runtime.unet)
    out = merge(tmp_path, [a, b], [0.7, -0.4])
    assert f"wrote {out}" in capsys.readouterr().out
    merged = load_model(out)
    assert_same_outputs(merged, outputs(runtime), base_outputs)
    header = read_lora_file(out).metadata  # a model file, read through the same safetensors reader
    assert header["modelspec.merged_from"] == "tiny-sd1, a, b"
    assert header["modelspec.title"] == "merged"
    assert header["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.fixture
def lycoris_kohya():
    """lycoris.kohya with its class-level preset settings restored afterwards (apply_preset changes them)."""
    kohya = pytest.importorskip("lycoris.kohya")
    cls = kohya.LycorisNetworkKohya
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}
    yield kohya
    for k, v in saved.items():
        setattr(cls, k, v)


@pytest.mark.parametrize(
    "algo,args,ratio",
    [("loha", {}, 0.7), ("lokr", {"factor": "4"}, 1.0), ("locon", {"dora_wd": "True"}, 0.5), ("full", {}, 0.6)],
    ids=["loha", "lokr", "lora-dora", "full"],
)
def test_lycoris_files_into_model_equal_lycoris_runtime(base_outputs, lycoris_kohya, tmp_path, algo, args, ratio):
    c = tiny_model(family_named("sd1"))
    net = lycoris_kohya.create_network(1.0, 4, 2.0, c.vae, c.text_encoder, c.unet, algo=algo, preset="attn-mlp", **args)
    net.apply_to(c.text_encoder, c.unet, True, True)
    randomise(net, 3)
    net.set_multiplier(ratio)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, dict(META))
    runtime = outputs(c)
    out = merge(tmp_path, [path], [ratio])
    assert_same_outputs(load_model(out), runtime, base_outputs)


def test_diffusers_folder_and_precision(tmp_path):
    a = our_lora(tmp_path / "a.safetensors", 1)
    out = merge(tmp_path, [a], [1.0], "--save_precision", "fp16", name="merged_dir")
    from safetensors.torch import load_file

    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    merged = load_model(out)  # loads back as a diffusers folder, with the LoRA merged
    runtime = tiny_model(family_named("sd1"))
    net, _ = lora.create_network_from_weights(1.0, str(a), runtime.vae, runtime.text_encoder, runtime.unet)
    net.merge_to(runtime.text_encoder, runtime.unet, read_lora_file(a).tensors)
    want = runtime.unet.state_dict()
    for key, value in merged.unet.state_dict().items():
        torch.testing.assert_close(value, want[key].half().float(), rtol=0, atol=0)  # fp16 rounding only


def error_of(capsys, argv: list[str]) -> str:
    assert run_cli(merge_lora.main, argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err  # log lines may precede the one error line
    return errors[0]


def test_mismatched_files_refused_in_one_line(tmp_path, capsys):
    sd2 = our_lora(tmp_path / "sd2.safetensors", 1, family="sd2")
    out = tmp_path / "m.safetensors"
    err = error_of(capsys, ["--sd_model", "tiny-sd1", "--models", str(sd2), "--ratios", "1", "--save_to", str(out)])
    assert str(sd2) in err and "does not fit" in err
    assert not out.exists()
    a = our_lora(tmp_path / "a.safetensors", 1)
    err = error_of(capsys, ["--models", str(a), str(sd2), "--ratios", "1", "1", "--save_to", str(out)])
    assert "sd2.safetensors" in err
    err = error_of(
        capsys, ["--sd_model", "tiny-sd1", "--models", str(a), "--ratios", "1", "0.5", "--save_to", str(out)]
    )
    assert "--ratios" in err


def module_deltas(path: Path) -> dict[str, torch.Tensor]:
    return {n: delta_weight(m) for n, m in parse_modules(read_lora_file(path).tensors).items()}


def test_concat_is_exactly_the_sum_of_deltas(tmp_path):
    a = our_lora(tmp_path / "a.safetensors", 1, conv_dim="4", conv_alpha="1")
    b = our_lora(tmp_path / "b.safetensors", 2, dim=8, alpha=8.0, conv_dim="2", conv_alpha="2")
    out = tmp_path / "ab.safetensors"
    argv = ["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--save_to", str(out), "--concat"]
    assert run_cli(merge_lora.main, argv) == 0
    da, db, got = module_deltas(a), module_deltas(b), module_deltas(out)
    assert set(got) == set(da) == set(db)
    for name, delta in got.items():
        torch.testing.assert_close(delta, 0.7 * da[name] + -0.4 * db[name], rtol=1e-6, atol=1e-6)
    file = read_lora_file(out)
    assert file.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 6  # conv ranks 4 + 2
    assert file.metadata["ss_network_dim"] == "Dynamic" and file.metadata["ss_network_alpha"] == "Dynamic"
    assert file.metadata["ss_network_module"] == "networks.lora" and file.metadata["ss_base_model_version"] == "sd_v1"
    assert file.metadata["modelspec.merged_from"] == "a, b" and file.metadata["modelspec.architecture"].endswith(
        "/lora"
    )
    c = tiny_model(family_named("sd1"))
    net, _ = lora.create_network_from_weights(1.0, str(out), c.vae, c.text_encoder, c.unet)
    net.load_weights(str(out))  # loads back in networks.lora
    # --shuffle permutes the rank axis: the same ΔW
    shuffled = tmp_path / "shuffled.safetensors"
    argv = ["--models", str(a), str(b), "--ratios", "0.7", "-0.4", "--save_to", str(shuffled), "--concat", "--shuffle"]
    assert run_cli(merge_lora.main, argv) == 0
    for name, delta in module_deltas(shuffled).items():
        torch.testing.assert_close(delta, got[name], rtol=1e-6, atol=1e-6)


def test_weighted_sum_follows_sd_scripts(tmp_path, capsys):
    a = our_lora(tmp_path / "a.safetensors", 1, alpha=2.0)
    b = our_lora(tmp_path / "b.safetensors", 2, alpha=8.0)
    out = tmp_path / "ab.safetensors"
    assert run_cli(merge_lora.main, ["--models", str(a), str(b), "--ratios", "0.5", "-2", "--save_to", str(out)]) == 0
    ta, tb, got = read_lora_file(a).tensors, read_lora_file(b).tensors, read_lora_file(out)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    s = 2.0 * -2  # sqrt(8 / 2) * ratio
    want_up = 0.5 * ta[f"{key}.lora_up.weight"] + abs(s) * tb[f"{key}.lora_up.weight"]
    want_down = 0.5 * ta[f"{key}.lora_down.weight"] + s * tb[f"{key}.lora_down.weight"]
    torch.testing.assert_close(got.tensors[f"{key}.lora_up.weight"], want_up, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got.tensors[f"{key}.lora_down.weight"], want_down, rtol=1e-7, atol=1e-7)
    assert float(got.tensors[f"{key}.alpha"]) == 2.0  # the first file's alpha
    assert (got.metadata["ss_network_dim"], got.metadata["ss_network_alpha"]) == ("4", "2.0")
    # different ranks cannot be summed: one line pointing at --concat
    c = our_lora(tmp_path / "c.safetensors", 3, dim=8)
    err = error_of(capsys, ["--models", str(a), str(c), "--ratios", "1", "1", "--save_to", str(out)])
    assert "c.safetensors" in err and "--concat" in err


def test_loha_and_dora_refused_for_lora_output(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = tmp_path / "loha.safetensors"
    t = {f"{name}.hada_w1_a": torch.randn(16, 2), f"{name}.hada_w1_b": torch.randn(2, 16)}
    t.update({f"{name}.hada_w2_a": torch.randn(16, 2), f"{name}.hada_w2_b": torch.randn(2, 16)})
    write_lora_file(loha, t)
    out = str(tmp_path / "o.safetensors")
    err = error_of(capsys, ["--models", str(loha), "--ratios", "1", "--save_to", out])
    assert "loha.safetensors" in err and "svd_merge_lora.py" in err
    dora = tmp_path / "dora.safetensors"
    t = {f"{name}.lora_down.weight": torch.randn(2, 16), f"{name}.lora_up.weight": torch.randn(16, 2)}
    write_lora_file(dora, {**t, f"{name}.dora_scale": torch.ones(16, 1)})
    err = error_of(capsys, ["--models", str(dora), "--ratios", "1", "--save_to", out])
    assert "DoRA" in err and "--sd_model" in err


def test_parser_matches_sd_scripts_flags():
    args = merge_lora.setup_parser().parse_args(["--models", "a", "--ratios", "1"])
    assert (args.precision, args.save_precision, args.sd_model, args.v2, args.concat, args.shuffle) == (
        "float",
        None,
        None,
        False,
        False,
        False,
    )
    assert json.dumps(args.ratios) == "[1.0]"
