"""SDXL LoRA files with sd-scripts' names (SGM UNet paths, lora_te1/lora_te2), read back by us and by diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.components import Components
from library.models.family import family_named
from library.models.sgm_names import SgmNames, is_sdxl_unet
from library.models.tiny import tiny_model
from networks import lora, lora_blocks

SDXL_BASE_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def tiny_sdxl(seed: int = 0) -> Components:
    """The tiny SDXL model (SDXL's topology: 3 levels of 2 layers, attention in the lower two, text_time)."""
    return tiny_model(family_named("sdxl"), seed=seed)


def random_up(net: lora.LoRANetwork, seed: int = 11) -> lora.LoRANetwork:
    """Give every LoRA non-zero up weights, as a trained one has, so applying it changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.text_encoder_loras + net.unet_loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return net


def targeted_paths(unet: torch.nn.Module) -> list[str]:
    """diffusers paths of every layer sd-scripts' SDXL LoRA targets with conv_dim (attention blocks and convs)."""
    targets = lora.UNET_TARGET_REPLACE_MODULE + lora.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
    return [
        f"{name}.{child_name}"
        for name, module in unet.named_modules()
        if type(module).__name__ in targets
        for child_name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear | torch.nn.Conv2d)
    ]


def test_sdxl_base_names_are_sd_scripts_sgm_names():
    """On SDXL base's own config (built on the meta device), names, counts and block indices are sd-scripts'.

    788 is the number of Linear/Conv2d layers inside sd-scripts' SdxlUNet2DConditionModel's Transformer2DModel,
    ResnetBlock2D, Downsample2D and Upsample2D modules; every name below is one of its module paths.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    assert is_sdxl_unet(unet)
    names = SgmNames(unet.config)
    paths = targeted_paths(unet)
    sgm = {names.to_sgm(p) for p in paths}
    assert len(paths) == len(sgm) == 788
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        ),
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "up_blocks.0.resnets.2.conv2": "output_blocks.2.0.out_layers.3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
    }
    for path, want in expected.items():
        assert names.to_sgm(path) == want and want in sgm
    assert names.to_sgm("time_embedding.linear_1") == "time_embedding.linear_1"  # outside the blocks: not renamed
    assert names.block_count() == 23
    layout = lora_blocks.unet_block_layout(unet)
    got = [
        lora_blocks.get_block_index(f"lora_unet_{n}", layout)
        for n in ("input_blocks_1_0_in_layers_2", "input_blocks_8_1_proj_in", "middle_block_0_emb_layers_1")
        + ("middle_block_2_out_layers_3", "output_blocks_0_1_proj_in", "output_blocks_8_0_skip_connection")
    ]
    assert got == [2, 9, 10, 12, 13, 21]


def test_diffusers_conversion_puts_our_names_on_the_modules_they_came_from():
    """diffusers' own kohya-SDXL conversion (an independent reader) maps each of our names back to its module."""
    c = tiny_sdxl()
    unet = c.unet
    net = lora.create_network(1.0, 4, 2.0, c.vae, c.text_encoders, unet, conv_dim="2")
    assert len(net.unet_loras) == len(targeted_paths(unet)) == 257
    sd = {}
    for m in net.unet_loras + net.text_encoder_loras:
        sd.update({f"{m.lora_name}.{k}": v for k, v in m.state_dict().items()})
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sd, unet.config))
    unet_keys = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    landed = {k.rsplit(".lora_", 1)[0] for k in unet_keys}
    assert landed == set(targeted_paths(unet))
    te2_keys = {k for k in converted if k.startswith("text_encoder_2.")}
    assert len(te2_keys) == 2 * sum(m.lora_name.startswith("lora_te2_") for m in net.text_encoder_loras) > 0


def test_sdxl_lora_in_diffusers_pipeline_matches_ours(tmp_path):
    """Our file in StableDiffusionXLPipeline.load_lora_weights gives our UNet and both encoders' outputs."""
    ours, theirs = tiny_sdxl(), tiny_sdxl()
    net = lora.create_network(1.0, 4, 2.0, ours.vae, ours.text_encoders, ours.unet, conv_dim="2", conv_alpha="1")
    random_up(net)
    path = tmp_path / "sdxl_lora.safetensors"
    net.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    keys = load_file(path).keys()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    assert not [k for k in keys if "down_blocks" in k or k.startswith("lora_te_")]
    net.apply_to(ours.text_encoders, ours.unet)
    net.eval()

    pipe = theirs.to_pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    n_unet = sum(1 for _, m in theirs.unet.named_modules() if hasattr(m, "lora_A"))
    n_te = sum(1 for te in theirs.text_encoders for _, m in te.named_modules() if hasattr(m, "lora_A"))
    assert (n_unet, n_te) == (len(net.unet_loras), len(net.text_encoder_loras))

    g = torch.Generator().manual_seed(5)
    width, pooled = ours.unet.config.cross_attention_dim, ours.text_encoders[1].config.projection_dim
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, width, generator=g)
    cond = {
        "text_embeds": torch.randn(2, pooled, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    with torch.no_grad():
        out_ours = ours.unet(x, t, ctx, added_cond_kwargs=cond).sample
        out_theirs = theirs.unet(x, t, ctx, added_cond_kwargs=cond).sample
        base = tiny_sdxl().unet(x, t, ctx, added_cond_kwargs=cond).sample
        for te_ours, te_theirs in zip(ours.text_encoders, theirs.text_encoders):
            torch.testing.assert_close(te_theirs(ids)[0], te_ours(ids)[0], rtol=1e-4, atol=1e-5)
        te2_ours, te2_theirs = ours.text_encoders[1](ids), theirs.text_encoders[1](ids)
        torch.testing.assert_close(te2_theirs.text_embeds, te2_ours.text_embeds, rtol=1e-4, atol=1e-5)
    assert (out_ours - base).abs().max() > 1e-2  # the LoRA has an effect
    torch.testing.assert_close(out_theirs, out_ours, rtol=1e-4, atol=1e-5)


def test_sdxl_file_reads_back_exactly_also_in_diffusers_spelling(tmp_path):
    """create_network_from_weights + load_weights restore every tensor; a file naming the UNet modules the
    diffusers way (``lora_unet_down_blocks_…``, as some tools write SDXL LoRA) lands on the same modules."""
    c = tiny_sdxl()
    unet, te1, te2 = c.unet, *c.text_encoders
    net = random_up(lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="2", conv_alpha="1"))
    path = tmp_path / "a.safetensors"
    net.save_weights(path, None, {})
    want = net.state_dict()

    back, _ = lora.create_network_from_weights(1.0, path, None, [te1, te2], unet)
    result = back.load_weights(path)
    assert not result.missing_keys and not result.unexpected_keys
    got = back.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())

    to_diffusers = {v: k for k, v in net.sdxl_diffusers_names.items()}
    spelled = {}
    for key, value in load_file(path).items():
        head, _, tail = key.partition(".")
        spelled[f"{to_diffusers.get(head, head)}.{tail}"] = value
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in spelled
    save_file(spelled, tmp_path / "b.safetensors")
    other, _ = lora.create_network_from_weights(1.0, tmp_path / "b.safetensors", None, [te1, te2], unet)
    other.load_weights(tmp_path / "b.safetensors")
    got = other.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_sdxl_block_dims_use_sd_scripts_23_slots():
    """block_dims on SDXL take 23 values (base, 9 input, 3 mid, 9 output, out); a 0 drops that block's modules."""
    c = tiny_sdxl()
    unet, te1, te2 = c.unet, *c.text_encoders
    dims = ["4"] * 23
    dims[5] = "0"  # input_blocks.4
    dims[11] = "2"  # middle_block.1 (the mid attention)
    net = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, block_dims=",".join(dims))
    names = {m.lora_name: m.lora_dim for m in net.unet_loras}
    assert not [n for n in names if n.startswith("lora_unet_input_blocks_4_")]
    assert any(n.startswith("lora_unet_input_blocks_5_1_") for n in names)
    assert {d for n, d in names.items() if n.startswith("lora_unet_middle_block_1_")} == {2}
    with pytest.raises(UserError, match="this UNet has 23 blocks"):
        lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, block_dims=",".join(["4"] * 25))

    weighted = lora.create_network(
        1.0, 4, 1.0, None, [te1, te2], unet, conv_dim="2", down_lr_weight="zeros", mid_lr_weight="1,2,3"
    )
    assert weighted.block_lr_weight == [1.0] + [0.0] * 9 + [1.0, 2.0, 3.0] + [1.0] * 9 + [1.0]
    assert not [m for m in weighted.unet_loras if m.lora_name.startswith("lora_unet_input_blocks_")]
    params, descriptions = weighted.prepare_optimizer_params(None, 1e-4)
    assert set(descriptions) == {f"unet_block{i}" for i in range(10, 22)}
    assert sorted(g["lr"] for g in params if g["lr"] != 1e-4) == pytest.approx([2e-4, 3e-4])


def test_sdxl_merge_gives_the_applied_outputs():
    """Merging a file's weights into a fresh SDXL model (as --network_merge does) equals applying the network."""
    ours, merged = tiny_sdxl(), tiny_sdxl()
    net = lora.create_network(1.0, 4, 2.0, None, ours.text_encoders, ours.unet, conv_dim="2", conv_alpha="1")
    weights = {k: v.clone() for k, v in random_up(net).state_dict().items()}
    net.apply_to(ours.text_encoders, ours.unet)
    net.eval()
    other, sd = lora.create_network_from_weights(1.0, None, None, merged.text_encoders, merged.unet, weights)
    other.merge_to(merged.text_encoders, merged.unet, sd)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ours.unet.config.cross_attention_dim, generator=g)
    pooled = ours.text_encoders[1].config.projection_dim
    cond = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64.0, 48, 8, 0, 64, 64]])}
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    with torch.no_grad():
        want = ours.unet(x, torch.tensor([400]), ctx, added_cond_kwargs=cond).sample
        got = merged.unet(x, torch.tensor([400]), ctx, added_cond_kwargs=cond).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for te_merged, te_ours in zip(merged.text_encoders, ours.text_encoders):
            torch.testing.assert_close(te_merged(ids)[0], te_ours(ids)[0], rtol=1e-4, atol=1e-5)
