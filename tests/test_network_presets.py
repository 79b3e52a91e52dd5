"""Target-layer presets of networks.lora (``--network_args preset=…``): LyCORIS's names and preset TOML files, each
layer adapted once, on the tiny SD1 model."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.recipes import lycoris_compat
from networks import lora


@pytest.fixture(scope="module")
def sd1():
    from library.models.tiny import make_tiny_model

    return make_tiny_model()


def layers(model: torch.nn.Module, prefix: str, keep) -> set[str]:
    """Module names (``prefix_path``) of the model's Linear/Conv2d layers whose path passes ``keep``."""
    return {
        f"{prefix}_{path}".replace(".", "_")
        for path, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and keep(path)
    }


def names(network) -> tuple[set[str], set[str]]:
    return {m.lora_name for m in network.unet_loras}, {m.lora_name for m in network.text_encoder_loras}


def create(c, **kwargs):
    return lora.create_network(1.0, 4, 2, None, c.text_encoder, c.unet, **kwargs)


def test_named_presets_target_the_layers_their_names_say(sd1):
    c = sd1
    te_prefix = "lora_te_text_model"
    unet, te = names(create(c, preset="attn-only"))
    assert unet == layers(c.unet, "lora_unet", lambda p: ".attn1." in p or ".attn2." in p) and len(unet) == 128
    assert te == layers(c.text_encoder, te_prefix, lambda p: ".self_attn." in p)
    default = names(create(c))
    assert names(create(c, preset="attn-mlp")) == default
    assert default[0] == layers(c.unet, "lora_unet", lambda p: ".attentions." in p)
    full = create(c, preset="full")
    unet, te = names(full)
    assert unet == layers(c.unet, "lora_unet", lambda p: True)  # every layer: conv_in/out, time embedding too
    assert te == layers(c.text_encoder, te_prefix, lambda p: ".self_attn." in p or ".mlp." in p)
    conv1 = {m.lora_name: m for m in full.unet_loras}["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv1.lora_dim, conv1.alpha.item()) == (4, 2.0)  # LyCORIS: conv layers take the network's dim
    with_conv_dim = create(c, preset="full", conv_dim="2", conv_alpha="1")
    conv1 = {m.lora_name: m for m in with_conv_dim.unet_loras}["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv1.lora_dim, conv1.alpha.item()) == (2, 1.0)
    unet, _ = names(create(c, preset="attn-mlp", conv_dim="2"))
    assert unet == default[0]  # attn-mlp has enable_conv = false, as LyCORIS's


PRESET_TOML = """
unet_target_module = ["Transformer2DModel"]
unet_target_name = ["conv_in", "down_blocks\\\\.0\\\\.attentions\\\\.0\\\\.proj_in", "time_embedding.linear_1"]
text_encoder_target_module = ["CLIPMLP"]
text_encoder_target_name = ["text_model.encoder.layers.0.self_attn.q_proj"]
exclude_name = [".*attn2"]
"""


def test_a_preset_file_targets_each_layer_once_where_lycoris_fails(sd1, tmp_path):
    """proj_in is reached by its class and by its name: one module here; LyCORIS 4.1.3 stops at its
    duplicate-name assertion on the same file."""
    c = sd1
    path = tmp_path / "preset.toml"
    path.write_text(PRESET_TOML)
    unet, te = names(create(c, preset=str(path), algo="loha"))
    expected = layers(c.unet, "lora_unet", lambda p: ".attentions." in p and ".attn2" not in p)
    assert unet == expected | {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1"}
    assert te == layers(c.text_encoder, "lora_te_text_model", lambda p: ".mlp." in p) | {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    }
    kohya = pytest.importorskip("lycoris.kohya")
    with lycoris_compat.preset_scope(kohya.LycorisNetworkKohya, lycoris_compat.default_preset()):
        with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_down_blocks_0_attentions_0_proj_in"):
            kohya.create_network(1.0, 4, 2, None, c.text_encoder, c.unet, preset=str(path))


def test_fnmatch_presets_and_keys_left_out_keep_lycoris_defaults(sd1, tmp_path):
    c = sd1
    path = tmp_path / "fn.toml"
    path.write_text('use_fnmatch = true\nunet_target_module = []\nunet_target_name = ["*.attn1.to_?"]\n')
    unet, te = names(create(c, preset=str(path)))
    assert unet == layers(c.unet, "lora_unet", lambda p: p.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v")))
    assert te == layers(c.text_encoder, "lora_te_text_model", lambda p: ".self_attn." in p or ".mlp." in p)


def test_bad_presets_are_refused_in_one_line(sd1, tmp_path):
    c = sd1
    maps = tmp_path / "maps.toml"
    maps.write_text('[module_algo_map.CLIPMLP]\nalgo = "lokr"\n')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('unet_target_modules = ["Transformer2DModel"]\n')
    regex = tmp_path / "regex.toml"
    regex.write_text('unet_target_name = ["conv_in("]\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("unet_target_name = = 1\n")
    cases = {
        "attn_only": r"preset=attn_only: neither a preset name \(attn-only, attn-mlp, full, ",
        str(maps): "maps.toml: module_algo_map \\(a different algo per layer\\) is not supported; use lycoris.kohya",
        str(unknown): r"unknown.toml: unknown preset keys \['unet_target_modules'\]; known: unet_target_module, ",
        str(regex): r"'conv_in\(' is not a valid regular expression",
        str(broken): r"broken.toml: cannot read the preset TOML",
    }
    for preset, message in cases.items():
        with pytest.raises(UserError, match=message):
            create(c, preset=preset)
