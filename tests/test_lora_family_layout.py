"""library.lora_family files and layout: real files written by our networks.lora and by the lycoris-lora package
on the tiny models, parsed, checked against the models' layers, base detection and one-line refusals."""

from __future__ import annotations

import pytest
import torch

import networks.lora as lora
from library.errors import UserError
from library.lora_family import (
    ModuleWeights,
    check_modules,
    detect_base,
    merged_weight,
    model_layers,
    parse_modules,
    read_lora_file,
    write_lora_file,
)
from library.metadata import precalculate_safetensors_hashes
from library.models.family import family_named
from library.models.tiny import tiny_model

kohya = pytest.importorskip("lycoris.kohya")


@pytest.fixture(scope="module")
def models(one_torch_thread):
    return {name: tiny_model(family_named(name)) for name in ("sd1", "sd2", "sdxl")}


def our_lora(components, path, **network_args) -> None:
    te = components.text_encoders if len(components.text_encoders) > 1 else components.text_encoders[0]
    net = lora.create_network(1.0, 4, 2.0, components.vae, te, components.unet, **network_args)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    net.save_weights(str(path), torch.float32, {"ss_network_module": "networks.lora"})
    return net


def count_layers(components) -> int:
    models = [components.unet, *components.text_encoders]
    return sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for model in models for m in model.modules())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_model_layers_cover_every_module_of_our_lora(models, family, tmp_path):
    components = models[family]
    path = tmp_path / "lora.safetensors"
    net = our_lora(components, path, conv_dim="2", conv_alpha="1")
    layers = model_layers(components)
    assert len(layers) == count_layers(components)  # every Linear/Conv2d, no two under one name
    file = read_lora_file(path)
    modules = parse_modules(file.tensors, str(path))
    assert set(modules) == {m.lora_name for m in net.text_encoder_loras + net.unet_loras}
    assert {m.kind for m in modules.values()} == {"lora"}
    found = check_modules(modules, components, str(path), file.metadata)
    for m in net.text_encoder_loras + net.unet_loras:
        assert found[m.lora_name] is m.org_module  # the same layer networks.lora modifies
    assert modules[next(iter(modules))].alpha == 2.0
    assert detect_base(modules, file.metadata).family == family
    if family == "sdxl":
        assert any(n.startswith("lora_te1_text_model_") for n in modules)
        assert any(n.startswith("lora_te2_text_model_") for n in modules)
        assert any(n.startswith("lora_unet_input_blocks_") for n in modules)
        # diffusers-spelled SDXL names reach the same layers
        aliased = model_layers(components, diffusers_sdxl_names=True)
        assert aliased["lora_unet_down_blocks_1_attentions_0_proj_in"] is layers["lora_unet_input_blocks_4_1_proj_in"]


@pytest.mark.parametrize(
    "algo,args,kinds",
    [
        ("loha", {}, {"loha"}),
        ("lokr", {"dora_wd": "True", "factor": "4"}, {"lokr+dora"}),
        ("locon", {"dora_wd": "True"}, {"lora+dora"}),
    ],
)
def test_files_written_by_lycoris_parse_and_fit(one_torch_thread, tmp_path, algo, args, kinds):
    """LyCORIS (transformers 5) writes lora_te_encoder_… names; parsing normalises them to lora_te_text_model_…."""
    components = tiny_model(family_named("sd1"))  # LyCORIS's apply_to hooks the layers: a model of its own
    torch.manual_seed(0)
    te, unet = components.text_encoder, components.unet
    net = kohya.create_network(1.0, 4, 2.0, components.vae, te, unet, algo=algo, preset="attn-mlp", **args)
    net.apply_to(te, unet, True, True)  # its modules join the state dict here
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    raw = read_lora_file(path)
    assert any(k.startswith("lora_te_encoder_layers_") for k in raw.tensors)  # what LyCORIS 4.1.3 writes here
    modules = parse_modules(raw.tensors, str(path))
    assert {m.kind for m in modules.values()} == kinds
    te = [n for n in modules if n.startswith("lora_te_")]
    assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
    found = check_modules(modules, components, str(path))
    assert len(found) == len(modules) == len(net.loras) == 218  # 24 text-encoder + 194 UNet (attn-mlp)
    layer = found["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert layer is components.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")


def test_write_and_read_back(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(2, 3), "lora_unet_a.alpha": torch.tensor(2.0)}
    path = tmp_path / "x.safetensors"
    write_lora_file(path, tensors, {"ss_network_dim": "2", "modelspec.title": "t"}, "fp16")
    back = read_lora_file(path)
    assert back.tensors["lora_unet_a.lora_down.weight"].dtype == torch.float16
    assert back.metadata["ss_network_dim"] == "2" and back.metadata["modelspec.title"] == "t"
    fp16 = {k: v.half() for k, v in tensors.items()}
    assert (back.metadata["sshs_model_hash"], back.metadata["sshs_legacy_hash"]) == precalculate_safetensors_hashes(
        fp16, {"ss_network_dim": "2"}
    )
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    pt = tmp_path / "x.pt"
    write_lora_file(pt, tensors, precision="bf16")
    assert read_lora_file(pt).tensors["lora_unet_a.lora_down.weight"].dtype == torch.bfloat16
    write_lora_file(pt, tensors, precision="float")
    assert read_lora_file(pt).tensors["lora_unet_a.lora_down.weight"].dtype == torch.float32
    with pytest.raises(UserError, match=r"--save_precision 'fp8'"):
        write_lora_file(pt, tensors, precision="fp8")


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors: LoRA file not found"):
        read_lora_file(tmp_path / "nope.safetensors")
    for name, data in (("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), ("bad.pt", b"garbage")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            read_lora_file(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_unknown_layouts_are_refused():
    with pytest.raises(UserError, match=r"x.safetensors: unknown key layout \(e.g. 'unet.down.lora_A.weight'\)"):
        parse_modules({"unet.down.lora_A.weight": torch.zeros(1)}, "x.safetensors")
    with pytest.raises(UserError, match=r"unknown key layout for module lora_unet_a .*lora_unet_a.weird"):
        parse_modules({"lora_unet_a.weird": torch.zeros(1), "lora_unet_a.alpha": torch.tensor(1.0)})
    with pytest.raises(UserError, match="unknown key layout for module lora_unet_a"):  # LyCORIS diag-OFT
        parse_modules({"lora_unet_a.oft_blocks": torch.zeros(2, 2, 2), "lora_unet_a.alpha": torch.tensor(1.0)})
    with pytest.raises(UserError, match="unknown key layout for module lora_unet_a"):  # half a LoRA pair
        parse_modules({"lora_unet_a.lora_down.weight": torch.zeros(1, 2)})


def lora_module(name: str, out_dim: int, in_dim: int, conv: bool = False) -> dict[str, torch.Tensor]:
    k = (1, 1) if conv else ()
    return {
        f"{name}.lora_down.weight": torch.zeros(2, in_dim, *k),
        f"{name}.lora_up.weight": torch.zeros(out_dim, 2, *k),
    }


def test_detect_base_from_shapes_names_and_metadata(models, tmp_path):
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert detect_base(parse_modules(lora_module(q, 768, 768))).family == "sd1"
    assert detect_base(parse_modules(lora_module(q, 1024, 1024))).family == "sd2"
    deep = "lora_te_text_model_encoder_layers_22_mlp_fc2"
    assert detect_base(parse_modules(lora_module(deep, 32, 64))).family == "sd2"
    proj = "lora_unet_mid_block_attentions_0_proj_in"
    assert detect_base(parse_modules(lora_module(proj, 32, 32, conv=True))).family == "sd1"
    assert detect_base(parse_modules(lora_module(proj, 32, 32))).family == "sd2"
    resnet = parse_modules(lora_module("lora_unet_mid_block_resnets_0_time_emb_proj", 32, 128))
    assert detect_base(resnet).family is None
    assert detect_base(resnet, {"ss_v2": "True"}).family == "sd2"
    assert detect_base(resnet, {"ss_base_model_version": "sdxl_base_v1-0"}).family == "sdxl"
    assert detect_base(resnet, {"ss_base_model_version": "sd_v1", "ss_v2": "False"}).family == "sd1"
    path = tmp_path / "sd2.safetensors"
    our_lora(models["sd2"], path)
    assert detect_base(parse_modules(read_lora_file(path).tensors)).family == "sd2"


def test_sd2_lora_on_sd1_model_fails_with_one_line(models, tmp_path):
    path = tmp_path / "sd2.safetensors"
    our_lora(models["sd2"], path)
    modules = parse_modules(read_lora_file(path).tensors, str(path))
    with pytest.raises(UserError) as err:
        check_modules(modules, models["sd1"], str(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: module lora_")
    assert "does not fit the layer's weight" in message and "an SD2 file on an SD1 model?" in message
    with pytest.raises(UserError, match=r"has no layer in this sd1 model; an SDXL file on an SD1 model\?"):
        check_modules(parse_modules(lora_module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 64, 32)), models["sd1"])


def test_oft_names_map_to_unet_layers(models):
    layers = model_layers(models["sd1"])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    out_dim = layers[name].weight.shape[0]
    oft = ModuleWeights(
        name.replace("lora_", "oft_", 1), "oft", {"oft_blocks": torch.zeros(4, out_dim // 4, out_dim // 4)}
    )
    assert check_modules({oft.name: oft}, models["sd1"])[oft.name] is layers[name]


def test_merging_through_the_api_equals_the_network_at_runtime(one_torch_thread, tmp_path):
    """Merge a conv LoRA written by networks.lora into the UNet with check_modules + merged_weight (multiplier
    0.7); the UNet's output then equals the unmerged UNet with the network applied at runtime (float32, 1e-5)."""
    runtime, merged = tiny_model(family_named("sd1")), tiny_model(family_named("sd1"))
    path = tmp_path / "lora.safetensors"
    net = our_lora(runtime, path, conv_dim="2", conv_alpha="1")
    net.set_multiplier(0.7)
    net.apply_to(runtime.text_encoder, runtime.unet, apply_text_encoder=False)
    modules = parse_modules(read_lora_file(path).tensors, str(path))
    unet_modules = {n: m for n, m in modules.items() if n.startswith("lora_unet_")}
    with torch.no_grad():
        for name, layer in check_modules(unet_modules, merged, str(path)).items():
            layer.weight.copy_(merged_weight(layer.weight, modules[name], 0.7))
        torch.manual_seed(1)
        latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
        want = runtime.unet(latents, 500, encoder_hidden_states=text).sample
        got = merged.unet(latents, 500, encoder_hidden_states=text).sample
        base = tiny_model(family_named("sd1")).unet(latents, 500, encoder_hidden_states=text).sample
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
