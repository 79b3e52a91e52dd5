"""networks.lora on the tiny SD models: key names, scale, dropouts, block-wise dims and lrs, LoRA+, files, merging."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from library.errors import UserError
from library.models.tiny import make_tiny_model
from library.recipes.network import parse_network_args
from networks import lora, lora_blocks

TE_MODULES = 4 * 6  # 4 CLIP layers x (q, k, v, out_proj, fc1, fc2)
UNET_MODULES = 16 * 12  # 16 Transformer2DModels x (proj_in/out, 2 x attn q/k/v/out, ff proj, ff out)
# conv_dim adds, per ResnetBlock2D, conv1/conv2 (3x3) + time_emb_proj (Linear), the 13 conv_shortcuts (1x1) of
# resnets whose channels change, and the 3 Downsample2D + 3 Upsample2D convs.
CONV_EXTRA = 22 * 3 + 13 + 3 + 3


def randomize_up(network: lora.LoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.text_encoder_loras + network.unet_loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def module(network: lora.LoRANetwork, name: str) -> lora.LoRAModule:
    return getattr(network, name)


def unet_inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def test_key_names_and_counts_sd1(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    sd = net.state_dict()
    assert len(net.text_encoder_loras) == TE_MODULES
    assert len(net.unet_loras) == UNET_MODULES
    assert len(sd) == 3 * (TE_MODULES + UNET_MODULES)
    for key in (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_3_mlp_fc2.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight",
        "lora_unet_up_blocks_3_attentions_2_proj_out.lora_down.weight",
    ):
        assert key in sd, key
    assert not any(k.startswith("lora_te_encoder") for k in sd)
    # SD1 proj_in is a 1x1 conv; the LoRA pair is 1x1 convs too
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 16, 1, 1)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (64, 4)
    assert all(float(v) == 1.0 for k, v in sd.items() if k.endswith(".alpha"))
    assert all(not v.any() for k, v in sd.items() if k.endswith("lora_up.weight"))


def test_sd2_proj_in_is_linear_and_conv_dim_adds_3x3(tiny_sd2):
    c = tiny_sd2
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, conv_dim="2", conv_alpha="0.5")
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 16)
    assert len(net.unet_loras) == UNET_MODULES + CONV_EXTRA
    conv1 = module(net, "lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv1.lora_down.weight.shape == (2, 16, 3, 3) and conv1.lora_up.weight.shape == (16, 2, 1, 1)
    assert conv1.scale == 0.25
    down = module(net, "lora_unet_down_blocks_0_downsamplers_0_conv")
    assert down.lora_down.stride == (2, 2)
    # Linear and 1x1 layers in resnets take network_dim / network_alpha
    assert module(net, "lora_unet_up_blocks_0_resnets_0_time_emb_proj").lora_dim == 4
    assert module(net, "lora_unet_up_blocks_0_resnets_0_conv_shortcut").lora_dim == 4


def test_output_delta_is_up_down_times_alpha_over_dim_times_multiplier(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(0.7, 4, 2.0, c.vae, c.text_encoder, c.unet)
    randomize_up(net)
    layer = c.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    m = module(net, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        base = x @ layer.weight.T
        expected = base + x @ (m.lora_up.weight @ m.lora_down.weight).T * (2.0 / 4) * 0.7
        net.apply_to(c.text_encoder, c.unet)
        net.eval()
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    net.set_multiplier(0.0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


class OpCounter(TorchFunctionMode):
    """Counts the torch functions and tensor methods called while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("multiplier", "alpha", "multiplies"), [(1.0, 4.0, 0), (1.0, 2.0, 1), (0.7, 4.0, 1)])
def test_forward_is_one_multiply_and_no_casts_in_float32(multiplier, alpha, multiplies):
    """The default fp32 step: no dtype casts, the two factors folded into one multiply (none when it is 1), and
    the same bits as multiplying by the multiplier and the scale one after the other whenever one of them is 1."""
    base = torch.nn.Linear(8, 6)
    m = lora.LoRAModule("lora_unet_x", base, multiplier=multiplier, lora_dim=4, alpha=alpha)
    with torch.no_grad():
        m.lora_up.weight.normal_()
    m.apply_to()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, base.weight, base.bias) + m.lora_up(m.lora_down(x)) * multiplier * (
            alpha / 4
        )
        with OpCounter() as counter:
            out = base(x)
    assert torch.equal(out, expected)
    assert counter.counts["to"] == 0
    assert counter.counts["mul"] + counter.counts["__mul__"] == multiplies


def test_alpha_zero_or_none_means_no_scaling(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 8, 0, c.vae, c.text_encoder, c.unet)
    assert {m.scale for m in net.unet_loras} == {1.0}
    assert float(net.state_dict()["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 8.0


def test_dropouts_act_in_train_only(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 4.0, c.vae, c.text_encoder, c.unet, neuron_dropout=0.5, rank_dropout="0.5")
    randomize_up(net)
    net.apply_to(c.text_encoder, c.unet)
    layer = c.text_encoder.encoder.layers[0].mlp.fc1
    m = module(net, "lora_te_text_model_encoder_layers_0_mlp_fc1")
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        org = torch.nn.functional.linear(x, layer.weight, layer.bias)
        net.eval()
        eval_out = layer(x)
        torch.testing.assert_close(eval_out, org + m.lora_up(m.lora_down(x)), rtol=1e-5, atol=1e-6)
        net.on_epoch_start(c.text_encoder, c.unet)
        torch.manual_seed(7)
        train_out = layer(x)
        torch.manual_seed(7)
        lx = torch.nn.functional.dropout(m.lora_down(x), p=0.5)
        mask = (torch.rand((2, 4)) > 0.5).unsqueeze(1)
        expected = org + m.lora_up(lx * mask) * (1.0 / (1 - 0.5))
    assert not torch.allclose(train_out, eval_out)
    torch.testing.assert_close(train_out, expected, rtol=1e-5, atol=1e-6)


def test_module_dropout_one_skips_lora_in_train(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, module_dropout="1.0")
    randomize_up(net)
    net.apply_to(c.text_encoder, c.unet)
    layer = c.unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2]
    x = torch.randn(2, 128)
    with torch.no_grad():
        org = torch.nn.functional.linear(x, layer.weight, layer.bias)
        net.train()
        torch.testing.assert_close(layer(x), org, rtol=0, atol=0)
        net.eval()
        assert not torch.allclose(layer(x), org)


def test_block_index_scheme():
    assert lora_blocks.get_block_index("lora_unet_down_blocks_0_resnets_0_conv1") == 1
    assert lora_blocks.get_block_index("lora_unet_down_blocks_0_downsamplers_0_conv") == 3
    assert lora_blocks.get_block_index("lora_unet_down_blocks_3_resnets_1_conv2") == 11
    assert lora_blocks.get_block_index("lora_unet_mid_block_attentions_0_proj_in") == 12
    assert lora_blocks.get_block_index("lora_unet_up_blocks_0_upsamplers_0_conv") == 15
    assert lora_blocks.get_block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 24
    assert lora_blocks.get_block_index("lora_unet_up_blocks_1_attentions_1_proj_out", (16, 4)) == 16 + 1 + 4 + 1


def test_block_dims_and_alphas(tiny_sd1):
    c = tiny_sd1
    assert lora_blocks.unet_block_layout(c.unet) == (12, 3)
    dims = [i % 5 + 1 for i in range(25)]
    dims[4] = 0  # down_blocks_1 layer 0: no LoRA
    alphas = [float(i) + 0.5 for i in range(25)]
    net = lora.create_network(
        1.0,
        4,
        1.0,
        c.vae,
        c.text_encoder,
        c.unet,
        block_dims=",".join(map(str, dims)),
        block_alphas=",".join(map(str, alphas)),
    )
    up = module(net, "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn1_to_v")  # 13 + 3*2 + 1 = 20
    assert up.lora_dim == dims[20] and float(up.alpha) == alphas[20]
    mid = module(net, "lora_unet_mid_block_attentions_0_proj_out")
    assert mid.lora_dim == dims[12] and mid.scale == alphas[12] / dims[12]
    assert not any("down_blocks_1_attentions_0" in m.lora_name for m in net.unet_loras)
    assert len(net.unet_loras) == UNET_MODULES - 12
    assert module(net, "lora_te_text_model_encoder_layers_0_self_attn_q_proj").lora_dim == 4
    with pytest.raises(UserError, match="block_dims: 3 values"):
        lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, block_dims="1,2,3")


def test_block_lr_weights_give_one_group_per_block(tiny_sd1):
    c = tiny_sd1
    down = "0,1,1,1,0.5,0.5,1,1,1,1,1,1"
    net = lora.create_network(
        1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, down_lr_weight=down, mid_lr_weight="2", up_lr_weight="zeros+0.25"
    )
    net.apply_to(c.text_encoder, c.unet)
    params, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    lrs = dict(zip(desc, [g["lr"] for g in params]))
    assert lrs["textencoder"] == 1e-5
    assert lrs["unet_block4"] == pytest.approx(0.5e-4)  # down_blocks_1 attentions_0
    assert lrs["unet_block12"] == pytest.approx(2e-4)
    assert lrs["unet_block20"] == pytest.approx(0.25e-4)
    blocks = {int(d[len("unet_block") :]) for d in desc if d.startswith("unet_block")}
    assert blocks == {1, 2, 4, 5, 7, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24}  # no attentions in down 3 / up 0
    sizes = {d: len(g["params"]) for d, g in zip(desc, params)}
    assert sizes["unet_block4"] == 12 * 2
    cos = lora_blocks.lr_weight_list({"down_lr_weight": "cosine"}, "down_lr_weight", 12)
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.0)
    assert cos[5] == pytest.approx(math.sin(math.pi * (6 / 11) / 2))


def test_loraplus_groups_and_lrs(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, loraplus_lr_ratio="16")
    net.apply_to(c.text_encoder, c.unet)
    params, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in params] == pytest.approx([1e-5, 1.6e-4, 1e-4, 1.6e-3])
    ups = {id(m.lora_up.weight) for m in net.unet_loras}
    assert {id(p) for p in params[3]["params"]} == ups
    assert not ups & {id(p) for p in params[2]["params"]}

    net = lora.create_network(
        1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, loraplus_lr_ratio="16", loraplus_unet_lr_ratio="4"
    )
    net.apply_to(c.text_encoder, c.unet)
    params, desc = net.prepare_optimizer_params(0, None, 1e-3)
    assert desc == ["unet", "unet plus"]  # text_encoder_lr 0: the text encoder is not trained
    assert [g["lr"] for g in params] == pytest.approx([1e-3, 4e-3])


def test_apply_unet_only_drops_text_encoder_keys(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    net.apply_to(c.text_encoder, c.unet, apply_text_encoder=False, apply_unet=True)
    keys = net.state_dict().keys()
    assert not any(k.startswith("lora_te") for k in keys) and len(keys) == 3 * UNET_MODULES
    assert [d for d in net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)[1]] == ["unet"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip_bit_exact(tiny_sd1, tmp_path, suffix):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 3.0, c.vae, c.text_encoder, c.unet, conv_dim="2")
    randomize_up(net)
    path = tmp_path / f"out{suffix}"
    net.save_weights(path, None, {"ss_network_dim": "4"})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    other = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, conv_dim="2")
    info = other.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    a, b = net.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_fp16(tiny_sd1, tmp_path):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    randomize_up(net)
    net.save_weights(tmp_path / "half.safetensors", torch.float16, None)
    saved = load_file(tmp_path / "half.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float16}
    ref = net.state_dict()
    assert all(torch.equal(saved[k], ref[k].half()) for k in ref)
    assert ref["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.float32


def test_create_network_from_weights_infers_dims_and_alphas(tiny_sd1, tmp_path):
    c = tiny_sd1
    dims = ",".join(str(i % 3 + 1) for i in range(25))
    net = lora.create_network(
        1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, block_dims=dims, conv_dim="3", conv_alpha="1.5"
    )
    randomize_up(net)
    sd = {k: v for k, v in net.state_dict().items()}
    del sd["lora_unet_mid_block_attentions_0_proj_in.alpha"]  # old files have no alpha: alpha = dim
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "old.safetensors")
    loaded, weights = lora.create_network_from_weights(
        1.0, str(tmp_path / "old.safetensors"), None, c.text_encoder, c.unet
    )
    assert {m.lora_name: m.lora_dim for m in loaded.unet_loras} == {m.lora_name: m.lora_dim for m in net.unet_loras}
    assert module(loaded, "lora_unet_mid_block_attentions_0_proj_in").scale == 1.0
    assert module(loaded, "lora_unet_down_blocks_0_resnets_0_conv1").scale == 1.5 / 3
    assert weights.keys() == sd.keys()


def test_max_norm_regularization_matches_hand_computation(tiny_sd1):
    c = tiny_sd1
    net = lora.create_network(1.0, 4, 2.0, c.vae, c.text_encoder, c.unet)
    big = module(net, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q")
    small = module(net, "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    with torch.no_grad():
        big.lora_up.weight.fill_(1.0)
        small.lora_up.weight.fill_(1e-4)
    up0, down0 = big.lora_up.weight.clone(), big.lora_down.weight.clone()
    norm = ((up0 @ down0) * 0.5).norm()
    assert norm > 1.0
    small_before = small.lora_up.weight.clone()
    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(1.0, "cpu")
    ratio = 1.0 / norm
    torch.testing.assert_close(big.lora_up.weight, up0 * ratio.sqrt())
    torch.testing.assert_close(big.lora_down.weight, down0 * ratio.sqrt())
    assert ((big.lora_up.weight @ big.lora_down.weight) * 0.5).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(small.lora_up.weight, small_before)
    # modules with zero up weights have norm 0, clamped to max/2, so ratio 1 and they are left alone
    assert keys_scaled == 1 and max_norm == pytest.approx(1.0, rel=1e-5)
    small_norm = ((small.lora_up.weight @ small.lora_down.weight) * 0.5).norm().item()
    n = len(net.unet_loras) + len(net.text_encoder_loras)
    assert mean_norm == pytest.approx((1.0 + small_norm) / n, rel=1e-4)


def test_merge_to_equals_applying(tmp_path):
    applied, merged = make_tiny_model(), make_tiny_model()
    net = lora.create_network(1.0, 4, 2.0, None, applied.text_encoder, applied.unet, conv_dim="2", conv_alpha="1")
    randomize_up(net)
    path = tmp_path / "l.safetensors"
    net.save_weights(path, None, None)
    net.set_multiplier(0.5)
    net.apply_to(applied.text_encoder, applied.unet)
    net.eval()
    file_net, weights = lora.create_network_from_weights(0.5, path, None, merged.text_encoder, merged.unet)
    file_net.merge_to(merged.text_encoder, merged.unet, weights)
    x, t, ctx = unet_inputs()
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(4))
    plain = make_tiny_model()
    with torch.no_grad():
        out_a, out_m = applied.unet(x, t, ctx).sample, merged.unet(x, t, ctx).sample
        te_a, te_m = applied.text_encoder(ids)[0], merged.text_encoder(ids)[0]
        assert not torch.allclose(out_a, plain.unet(x, t, ctx).sample, atol=1e-3)
    torch.testing.assert_close(out_m, out_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(te_m, te_a, rtol=1e-4, atol=1e-5)


def test_text_encoder_keys_without_text_model_are_read(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    c = tiny_sd1
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    randomize_up(net)
    sd = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "t5names.safetensors")
    other = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    info = other.load_weights(tmp_path / "t5names.safetensors")
    assert not info.missing_keys and not info.unexpected_keys
    key = "lora_te_text_model_encoder_layers_2_mlp_fc2.lora_up.weight"
    assert torch.equal(other.state_dict()[key], net.state_dict()[key])


def test_network_args_parsing_and_errors(tiny_sd1, tmp_path):
    assert parse_network_args(["conv_dim=4", "preset=a=b", " algo = loha "]) == {
        "conv_dim": "4",
        "preset": "a=b",
        "algo": "loha",
    }
    with pytest.raises(UserError, match="'conv_dim' is not key=value"):
        parse_network_args(["conv_dim"])
    c = tiny_sd1
    with pytest.raises(UserError, match="conv_dim=four"):
        lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, conv_dim="four")
    with pytest.raises(UserError, match="down_lr_weight=bogus"):
        lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, down_lr_weight="bogus")
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 3)
    net = lora.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
    with pytest.raises(UserError, match="x.safetensors"):
        net.load_weights(tmp_path / "x.safetensors")


def test_low_precision_base_layer_with_float32_lora():
    base = torch.nn.Linear(8, 6).to(torch.bfloat16)
    m = lora.LoRAModule("lora_unet_x", base, lora_dim=2, alpha=2)
    with torch.no_grad():
        m.lora_up.weight.fill_(0.5)
    m.apply_to()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = base(x)
        expected = torch.nn.functional.linear(x, base.weight, base.bias) + (
            x.float() @ (m.lora_up.weight @ m.lora_down.weight).T
        ).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and m.lora_down.weight.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
