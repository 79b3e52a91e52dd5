"""networks.oft (sd-scripts' OFT) on the tiny models: oft_unet_ keys and block shapes, the Cayley rotation of the
base weight, zero blocks as the identity, merging, files read back, and training with exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import train_network
from library.errors import UserError
from library.io import load_safetensors
from library.models.family import family_named
from library.models.tiny import make_tiny_model, tiny_model
from networks import oft
from tests.training import network_args, write_frog_dataset

ATTN_MODULES = 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
ALL_LINEAR = 16 * 12  # + proj_in, proj_out, ff.net.0.proj, ff.net.2 per Transformer2DModel
CONV_EXTRA = 22 * 3 + 13 + 3 + 3  # ResNet conv1/conv2/time_emb_proj, 13 conv_shortcuts, 3 down- + 3 upsamplers


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread is fastest on a shared 2-core machine."""


def randomize(network: oft.OFTNetwork, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.unet_ofts:
            m.oft_blocks.copy_(torch.randn(m.oft_blocks.shape, generator=g) * std)


def run_unet(c, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return c.unet(x, torch.tensor([10, 500]), ctx).sample


def test_keys_and_shapes_follow_sd_scripts(sd1):
    c = sd1
    net = oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet)
    sd = net.state_dict()
    assert len(net.unet_ofts) == ATTN_MODULES and len(sd) == 2 * ATTN_MODULES
    key = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{key}.oft_blocks"].shape == (4, 4, 4)  # 16 outputs in 4 blocks of 4
    assert sd[f"{key}.alpha"].shape == () and sd[f"{key}.alpha"].dtype == torch.float32
    assert sd[f"{key}.alpha"].item() == torch.tensor(1e-3).item()
    assert sd["oft_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.oft_blocks"].shape == (4, 8, 8)
    assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in sd)
    assert not any(torch.count_nonzero(v) for k, v in sd.items() if k.endswith("oft_blocks"))
    wide = oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet, enable_all_linear="true")
    assert len(wide.unet_ofts) == ALL_LINEAR
    wide_sd = wide.state_dict()
    assert wide_sd["oft_unet_down_blocks_0_attentions_0_proj_in.oft_blocks"].shape == (4, 4, 4)
    assert wide_sd["oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.oft_blocks"].shape == (
        4,
        32,
        32,
    )
    conv = oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet, enable_conv="True", enable_all_linear="0")
    assert len(conv.unet_ofts) == ATTN_MODULES + CONV_EXTRA
    assert conv.state_dict()["oft_unet_up_blocks_0_resnets_0_conv1.oft_blocks"].shape == (4, 8, 8)


def test_sdxl_modules_get_sd_scripts_sgm_names():
    c = tiny_model(family_named("sdxl"))
    sd = oft.create_network(1.0, 4, 1e-3, None, c.text_encoders, c.unet, enable_conv="true").state_dict()
    assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.oft_blocks" in sd
    assert "oft_unet_input_blocks_1_0_in_layers_2.oft_blocks" in sd
    assert not any("down_blocks" in k for k in sd)


def test_forward_is_cayley_rotation_of_the_weight():
    """W' = blockdiag(R)ᵀ W with R = (I + Q)(I - Q)⁻¹, Q = B - Bᵀ clipped to norm alpha * out_dim, weighted by the
    multiplier; with multiplier 1 each block is orthogonal, so the weight's column norms per block are kept."""
    torch.manual_seed(0)
    base = nn.Linear(5, 6)
    m = oft.OFTModule("oft_unet_test", base, multiplier=1.0, dim=2, alpha=0.1)
    m.apply_to()
    with torch.no_grad():
        m.oft_blocks.normal_()
    x = torch.randn(4, 5)
    q = m.oft_blocks.detach() - m.oft_blocks.detach().transpose(1, 2)
    q = q * (0.1 * 6 / q.norm())  # norm above the constraint 0.6: clipped to it
    eye = torch.eye(3).expand(2, 3, 3)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    w = torch.block_diag(*r).T @ base.weight.detach()
    torch.testing.assert_close(base(x), x @ w.T + base.bias.detach(), rtol=0, atol=1e-6)
    blocks = w.reshape(2, 3, 5)
    torch.testing.assert_close(blocks.norm(dim=1), base.weight.detach().reshape(2, 3, 5).norm(dim=1))
    m.multiplier = 0.5
    w_half = torch.block_diag(*(0.5 * (r - eye) + eye)).T @ base.weight.detach()
    torch.testing.assert_close(base(x), x @ w_half.T + base.bias.detach(), rtol=0, atol=1e-6)
    m.to(torch.float16)  # as gen_img hooks a network in half precision: the rotation is still built in float32
    torch.testing.assert_close(base(x), x @ w_half.T + base.bias.detach(), rtol=0, atol=1e-3)
    m.multiplier = 0.0
    assert torch.equal(base(x), m._org_forward(x))


def test_zero_blocks_are_the_identity_exactly():
    c, plain = make_tiny_model(), make_tiny_model()
    net = oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet, enable_all_linear="true", enable_conv="true")
    net.apply_to(c.text_encoder, c.unet)
    assert torch.equal(run_unet(c), run_unet(plain))


def test_merge_equals_applying_and_file_reads_back(tmp_path):
    applied, merged = make_tiny_model(), make_tiny_model()
    net = oft.create_network(0.7, 4, 5e-3, None, applied.text_encoder, applied.unet, enable_conv="true")
    randomize(net)
    path = tmp_path / "oft.safetensors"
    net.save_weights(path, None, {"ss_network_module": "networks.oft"})
    net.apply_to(applied.text_encoder, applied.unet)
    out = run_unet(applied)
    assert (out - run_unet(make_tiny_model())).abs().max() > 1e-3
    back, weights = oft.create_network_from_weights(0.7, path, None, merged.text_encoder, merged.unet)
    assert back.is_mergeable() and set(back.state_dict()) == set(net.state_dict())
    back.merge_to(merged.text_encoder, merged.unet, weights, torch.float32, "cpu")
    torch.testing.assert_close(run_unet(merged), out, rtol=0, atol=1e-5)
    pickled = tmp_path / "oft.pt"
    net.save_weights(pickled, None, None)
    again = make_tiny_model()
    loaded, _ = oft.create_network_from_weights(1.0, pickled, None, again.text_encoder, again.unet)
    info = loaded.load_weights(pickled)
    assert (info.missing_keys, info.unexpected_keys) == ([], [])
    saved = net.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_bad_input_is_one_line_errors(sd1, tmp_path):
    c = sd1
    with pytest.raises(UserError, match="16 output features cannot be split into --network_dim 3 blocks"):
        oft.create_network(1.0, 3, 1e-3, None, c.text_encoder, c.unet)
    with pytest.raises(UserError, match="enable_conv=maybe: expected true or false"):
        oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet, enable_conv="maybe")
    net = oft.create_network(1.0, 4, 1e-3, None, c.text_encoder, c.unet)
    with pytest.raises(UserError, match="networks.oft trains the UNet only"):
        net.apply_to(c.text_encoder, c.unet, True, False)
    other = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="no oft_blocks found"):
        oft.create_network_from_weights(1.0, other, None, c.text_encoder, c.unet)
    with pytest.raises(UserError, match="no key of this file matches the network"):
        net.load_weights(other)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def test_trains_end_to_end_with_exact_resume_and_loads_back(model_dir, data_dir, tmp_path):
    """4 steps straight == 2 steps + --resume, bitwise; the file then continues through --network_weights."""
    run = ["--network_module", "networks.oft", "--network_alpha", "1e-2", "--network_train_unet_only"]
    run += ["--network_args", "enable_conv=true", "--output_name", "net", "--max_train_steps", "4"]
    straight = tmp_path / "straight"
    train_network.main(network_args(model_dir, data_dir, straight, *run, "--save_every_n_steps", "2", "--save_state"))
    resumed = tmp_path / "resumed"
    state = str(straight / "net-step00000002-state")
    train_network.main(network_args(model_dir, data_dir, resumed, *run, "--resume", state))
    final, metadata = load_safetensors(straight / "net.safetensors")
    again, _ = load_safetensors(resumed / "net.safetensors")
    assert final.keys() == again.keys() and len(final) == 2 * (ATTN_MODULES + CONV_EXTRA)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert metadata["ss_network_module"] == "networks.oft" and metadata["ss_network_alpha"] == "0.01"
    # every module trained but the mid block's self-attention q and k: it sees one token, so softmax ignores them
    untrained = {k.split(".")[0] for k in final if k.endswith("oft_blocks") and not final[k].any()}
    mid = "oft_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_"
    assert untrained == {f"{mid}q", f"{mid}k"}
    tiny_lr = ["--max_train_steps", "1", "--learning_rate", "1e-9"]
    tiny_lr += ["--network_weights", str(straight / "net.safetensors")]
    loaded = tmp_path / "loaded"
    train_network.main(network_args(model_dir, data_dir, loaded, *run[:-2], *tiny_lr))
    cont, _ = load_safetensors(loaded / "net.safetensors")
    assert cont.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(cont[key], final[key], rtol=0, atol=1e-6)
