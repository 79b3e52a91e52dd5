"""LDM <-> diffusers key conversion, checked against diffusers' own converter and SD 1.5's known key names."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from library.models.convert import (
    sd1_text_from_ldm,
    sd1_text_to_ldm,
    sd2_text_from_ldm,
    sd2_text_to_ldm,
    unet_from_ldm,
    unet_to_ldm,
    vae_from_ldm,
    vae_to_ldm,
)
from library.models.tiny import make_tiny_model

ODD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 24),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=12,
    attention_head_dim=2,
)
ODD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 24),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _unet(index: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**ODD_UNET) if index == 2 else make_tiny_model(v2=index == 1).unet


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sd1", "sd2", "odd-layout"])
def test_unet_to_ldm_is_read_back_identically_by_diffusers_converter(index):
    unet = _unet(index)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    _same(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())
    _same(unet_from_ldm(ldm, unet.config), unet.state_dict())


@pytest.mark.parametrize("odd", [False, True])
def test_vae_to_ldm_is_read_back_identically_by_diffusers_converter(odd):
    torch.manual_seed(0)
    vae = AutoencoderKL(**ODD_VAE) if odd else make_tiny_model().vae
    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    last = vae.config.layers_per_block  # the decoder has one more resnet per level, and its levels run in reverse
    assert ldm[f"first_stage_model.decoder.up.0.block.{last}.conv2.weight"].shape[0] == vae.config.block_out_channels[0]
    _same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())
    _same(vae_from_ldm(ldm, vae.config), vae.state_dict())
    bare = {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}
    _same(vae_from_ldm(bare, vae.config, prefix=""), vae.state_dict())


def test_sd15_sized_unet_maps_to_the_well_known_ldm_key_names():
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    p = "model.diffusion_model."
    for key in (
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "out.0.weight",
        "out.2.bias",
    ):
        assert p + key in ldm, key
    assert len(ldm) == 686 and ldm[p + "input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)


def test_unet_projections_are_reshaped_to_what_the_config_asks():
    sd1 = make_tiny_model(v2=False).unet
    ldm = unet_to_ldm(sd1.state_dict(), sd1.config)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert ldm[key].shape == (16, 16, 1, 1)
    linear = unet_from_ldm(ldm, {**sd1.config, "use_linear_projection": True})
    assert linear["down_blocks.0.attentions.0.proj_in.weight"].shape == (16, 16)
    sd2 = make_tiny_model(v2=True).unet
    ldm2 = unet_to_ldm(sd2.state_dict(), sd2.config)
    assert ldm2[key].shape == (16, 16)
    conv = unet_from_ldm(ldm2, {**sd2.config, "use_linear_projection": False})
    assert torch.equal(conv["down_blocks.0.attentions.0.proj_in.weight"][:, :, 0, 0], ldm2[key])


def test_unexpected_unet_key_is_reported():
    sd1 = make_tiny_model().unet
    ldm = unet_to_ldm(sd1.state_dict(), sd1.config)
    ldm["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="input_blocks.99"):
        unet_from_ldm(ldm, sd1.config)


def test_sd1_text_encoder_is_written_with_text_model_and_read_with_or_without_it():
    te = make_tiny_model().text_encoder
    ldm = sd1_text_to_ldm(te.state_dict())
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm
    assert "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.bias" in ldm
    _same(sd1_text_from_ldm(ldm), te.state_dict())
    without = {k.replace("text_model.", ""): v for k, v in ldm.items()}
    without["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    _same(sd1_text_from_ldm(without), te.state_dict())


def test_sd2_text_encoder_uses_openclip_names_with_a_dummy_last_block():
    te = make_tiny_model(v2=True).text_encoder
    sd = te.state_dict()
    ldm = sd2_text_to_ldm(sd, te.config.num_hidden_layers)
    p = "cond_stage_model.model."
    blocks = {k.split(".")[4] for k in ldm if k.startswith(p + "transformer.resblocks.")}
    assert blocks == {"0", "1", "2", "3", "4"}  # 4 layers + the penultimate-layer dummy
    fused = ldm[p + "transformer.resblocks.2.attn.in_proj_weight"]
    assert fused.shape == (96, 32)
    assert torch.equal(fused[:32], sd["encoder.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(fused[32:64], sd["encoder.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(fused[64:], sd["encoder.layers.2.self_attn.v_proj.weight"])
    assert torch.equal(ldm[p + "transformer.resblocks.4.mlp.c_fc.weight"], sd["encoder.layers.3.mlp.fc1.weight"])
    assert torch.equal(ldm[p + "positional_embedding"], sd["embeddings.position_embedding.weight"])
    assert torch.equal(ldm[p + "text_projection"], torch.ones(32, 32))
    _same(sd2_text_from_ldm(ldm), sd)


@pytest.mark.parametrize("v2", [False, True], ids=["sd15", "sd21-768v"])
def test_full_size_configs_are_inferred_from_ldm_shapes(v2):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.convert import ldm_state_dict
    from library.models.detect import detect_single_file

    heads = [5, 10, 20, 20] if v2 else 8
    width = 1024 if v2 else 768
    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=width, attention_head_dim=heads, use_linear_projection=v2)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
        layers = 23 if v2 else 12
        te = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=layers))
    ldm = ldm_state_dict(unet, vae, te, v2)
    metadata = {"modelspec.architecture": "stable-diffusion-v2-768-v"} if v2 else {}
    info = detect_single_file(ldm, metadata, "model.safetensors")
    assert info.family.v2 is v2 and info.v_parameterization is (True if v2 else None) and not info.exact
    assert info.family.name == ("sd2" if v2 else "sd1")
    u = info.configs["unet"]
    assert u["block_out_channels"] == [320, 640, 1280, 1280] and u["layers_per_block"] == 2
    assert u["attention_head_dim"] == heads and u["cross_attention_dim"] == width
    assert u["use_linear_projection"] is v2 and u["norm_num_groups"] == 32 and u["sample_size"] == (96 if v2 else 64)
    assert u["down_block_types"] == list(unet.config.down_block_types)
    assert u["up_block_types"] == list(unet.config.up_block_types)
    v = info.configs["vae"]
    assert v["block_out_channels"] == [128, 256, 512, 512] and v["layers_per_block"] == 2
    t = info.configs["text_encoder"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]) == (width, layers, width // 64)
    assert t["hidden_act"] == ("gelu" if v2 else "quick_gelu")
