"""networks.dylora (sd-scripts' DyLoRA) on the tiny SD1 model: plain-LoRA keys, the per-step rank rule, one unit
trained per step, files that networks.lora loads with the same output, merging, and training with exact resume."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import train_network
from library.errors import UserError
from library.io import load_safetensors
from library.models.family import family_named
from library.models.tiny import make_tiny_model, tiny_model
from networks import dylora, extract_lora_from_dylora, lora
from tests.training import network_args, write_frog_dataset

TE_MODULES = 4 * 6  # 4 CLIP layers x (q, k, v, out_proj, fc1, fc2)
UNET_MODULES = 16 * 12  # 16 Transformer2DModels x (proj_in/out, 2 x attn q/k/v/out, ff proj, ff out)
CONV_EXTRA = 22 * 3 + 13 + 3 + 3  # ResNet conv1/conv2/time_emb_proj, 13 conv_shortcuts, 3 down- + 3 upsamplers


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread is fastest on a shared 2-core machine."""


def randomize(network: dylora.DyLoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    """Random up weights (they start at zero), so the network changes the output and the down halves get grads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            for p in m.lora_B:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(seed: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    return ids, torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 500])


def run_model(c, seed: int = 3, size: int = 8) -> torch.Tensor:
    """UNet output on text-encoder states (the mid block's self-attention sees size / 8 squared tokens)."""
    ids, x, t = inputs(seed, size)
    return c.unet(x, t, c.text_encoder(ids)[0]).sample


def test_keys_and_shapes_are_sd_scripts_plain_lora(sd1):
    c = sd1
    net = dylora.create_network(1.0, 4, 2.0, None, c.text_encoder, c.unet, unit="2", conv_dim="4")
    sd = net.state_dict()
    assert (len(net.text_encoder_loras), len(net.unet_loras)) == (TE_MODULES, UNET_MODULES + CONV_EXTRA)
    assert len(sd) == 3 * (TE_MODULES + UNET_MODULES + CONV_EXTRA)
    golden = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (32, 4),
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight": (64, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 16, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (16, 4, 1, 1),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 32),
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight": (4, 16, 3, 3),
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight": (32, 4, 1, 1),
        "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight": (4, 32, 3, 3),
        "lora_unet_up_blocks_3_attentions_2_proj_out.alpha": (),
    }
    for key, shape in golden.items():
        assert tuple(sd[key].shape) == shape, key
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(sd[k].dtype == torch.float32 and sd[k].item() == 2.0 for k in sd if k.endswith(".alpha"))
    # one trainable tensor per rank and half (sd-scripts' lora_A.i / lora_B.i), 4 ranks each
    q = net.lora_te_text_model_encoder_layers_0_self_attn_q_proj
    assert [n for n, _ in q.named_parameters()] == [f"lora_A.{i}" for i in range(4)] + [f"lora_B.{i}" for i in range(4)]
    assert q.lora_A[2].shape == (1, 32) and q.lora_B[2].shape == (32, 1)
    assert sum(1 for _ in net.parameters()) == 8 * (TE_MODULES + UNET_MODULES + CONV_EXTRA)


def test_sdxl_names_are_networks_lora_names():
    """SDXL: ``lora_te1_``/``lora_te2_`` and sd-scripts' SGM UNet names, exactly the modules networks.lora makes."""
    c = tiny_model(family_named("sdxl"))
    sd = dylora.create_network(1.0, 4, 1.0, None, c.text_encoders, c.unet).state_dict()
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2.lora_up.weight" in sd
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert set(sd) == set(lora.create_network(1.0, 4, 1.0, None, c.text_encoders, c.unet).state_dict())


def test_training_forward_uses_sd_scripts_rank_rule():
    """rank = randint(0, dim - 1) rounded down to the unit; output = base + up @ down x * alpha / dim *
    sqrt(dim / (rank + unit)); only ranks [rank, rank + unit) take gradients. Eval mode: factor 1, no draw."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = dylora.DyLoRAModule("lora_test", base, 1.0, lora_dim=8, alpha=3.0, unit=2)
    m.apply_to()
    with torch.no_grad():
        for p in m.lora_B:
            p.normal_()
    x = torch.randn(3, 6)
    down, up = (w.detach() for w in m.weights())
    delta = x @ down.T @ up.T
    for seed in range(6):
        random.seed(seed)
        expected_rank = random.Random(seed).randint(0, 7) // 2 * 2
        m.train()
        out = base(x)
        factor = 3.0 / 8 * math.sqrt(8 / (expected_rank + 2))
        torch.testing.assert_close(out, m._org_forward(x) + delta * factor, rtol=0, atol=1e-6)
        trained = [i for i, p in enumerate(m.lora_A) if p.requires_grad]
        assert trained == [expected_rank, expected_rank + 1]
        assert [i for i, p in enumerate(m.lora_B) if p.requires_grad] == trained
    state = random.getstate()
    m.eval()
    torch.testing.assert_close(base(x), m._org_forward(x) + delta * (3.0 / 8), rtol=0, atol=1e-6)
    assert random.getstate() == state


def test_one_step_changes_only_the_drawn_unit_of_each_module():
    c = make_tiny_model()
    net = dylora.create_network(1.0, 4, 4.0, None, c.text_encoder, c.unet, unit="2", conv_dim="4")
    randomize(net)
    net.apply_to(c.text_encoder, c.unet)
    groups, names = net.prepare_optimizer_params(None, None, 0.1)
    assert names == ["textencoder", "unet"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    random.seed(7)
    net.train()
    run_model(c, size=16).square().mean().backward()  # 4 mid-block tokens: every layer gets gradients
    torch.optim.SGD(groups, lr=0.1).step()
    after = net.state_dict()
    starts = []
    for m in net.loras:
        start = next(i for i, p in enumerate(m.lora_A) if p.requires_grad)
        starts.append(start)
        expected = [start <= i < start + 2 for i in range(4)]
        down = after[f"{m.lora_name}.lora_down.weight"] != before[f"{m.lora_name}.lora_down.weight"]
        up = after[f"{m.lora_name}.lora_up.weight"] != before[f"{m.lora_name}.lora_up.weight"]
        assert down.flatten(1).any(1).tolist() == expected, m.lora_name  # rows of down
        assert up.transpose(0, 1).flatten(1).any(1).tolist() == expected, m.lora_name  # columns of up
    # each module draws on its own: both units are trained somewhere
    assert sorted(set(starts)) == [0, 2]


def test_file_is_a_plain_lora_that_networks_lora_runs_the_same(tmp_path):
    dy_model, lora_model = make_tiny_model(), make_tiny_model()
    net = dylora.create_network(1.0, 4, 2.0, None, dy_model.text_encoder, dy_model.unet, unit="1", conv_dim="4")
    randomize(net)
    path = tmp_path / "dy.safetensors"
    net.save_weights(path, None, {"ss_network_module": "networks.dylora"})
    net.apply_to(dy_model.text_encoder, dy_model.unet)
    net.eval()
    plain, weights = lora.create_network_from_weights(1.0, path, None, lora_model.text_encoder, lora_model.unet)
    plain.apply_to(lora_model.text_encoder, lora_model.unet)
    info = plain.load_weights(path)
    assert (info.missing_keys, info.unexpected_keys) == ([], [])
    assert len(weights) == 3 * (TE_MODULES + UNET_MODULES + CONV_EXTRA)
    plain.eval()
    with torch.no_grad():
        out_dy, out_lora = run_model(dy_model), run_model(lora_model)
        assert (out_dy - run_model(make_tiny_model())).abs().max() > 1e-3  # the network does change the output
    torch.testing.assert_close(out_dy, out_lora, rtol=0, atol=1e-6)


def test_file_round_trip_and_merge(tmp_path):
    applied, merged = make_tiny_model(), make_tiny_model()
    net = dylora.create_network(0.5, 4, 2.0, None, applied.text_encoder, applied.unet, conv_dim="4")
    randomize(net)
    path = tmp_path / "dy.safetensors"
    net.save_weights(path, torch.float16, None)
    assert load_safetensors(path)[0]["lora_unet_mid_block_resnets_0_conv1.lora_up.weight"].dtype == torch.float16
    net.save_weights(path, None, None)
    back, weights = dylora.create_network_from_weights(0.5, path, None, merged.text_encoder, merged.unet)
    assert back.is_mergeable()
    pickled = tmp_path / "dy.pt"
    net.save_weights(pickled, None, None)
    again = make_tiny_model()
    loaded, _ = dylora.create_network_from_weights(0.5, pickled, None, again.text_encoder, again.unet)
    assert loaded.load_weights(pickled).missing_keys == []
    saved = net.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    back.merge_to(merged.text_encoder, merged.unet, weights)
    net.apply_to(applied.text_encoder, applied.unet)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(run_model(merged), run_model(applied), rtol=0, atol=1e-5)


def test_bad_arguments_are_one_line_errors(sd1, tmp_path):
    c = sd1
    with pytest.raises(UserError, match="--network_dim 6 is not a multiple of --network_args unit=4"):
        dylora.create_network(1.0, 6, 1.0, None, c.text_encoder, c.unet, unit="4")
    with pytest.raises(UserError, match="conv_dim=2: DyLoRA needs conv_dim equal to --network_dim"):
        dylora.create_network(1.0, 4, 1.0, None, c.text_encoder, c.unet, conv_dim="2")
    small = dylora.create_network(1.0, 2, 1.0, None, c.text_encoder, c.unet)
    path = tmp_path / "small.safetensors"
    small.save_weights(path, None, None)
    with pytest.raises(UserError, match="weights do not fit the network"):
        dylora.create_network(1.0, 4, 1.0, None, c.text_encoder, c.unet).load_weights(path)
    split = ["--model", str(path), "--save_to", str(tmp_path / "out.safetensors")]
    with pytest.raises(UserError, match="the file does not record its unit; give --unit"):
        extract_lora_from_dylora.main(split)
    with pytest.raises(UserError, match="--unit 2: the file's rank is 2, so there is no smaller rank to extract"):
        extract_lora_from_dylora.main([*split, "--unit", "2"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def test_trains_end_to_end_with_exact_resume_and_loads_back(model_dir, data_dir, tmp_path):
    """4 steps straight == 2 steps + --resume, bitwise (the ranks come from the restored python RNG); the file then
    continues through --network_weights."""
    run = ["--network_module", "networks.dylora", "--network_args", "unit=2", "conv_dim=4", "--output_name", "net"]
    run += ["--max_train_steps", "4"]
    straight = tmp_path / "straight"
    train_network.main(network_args(model_dir, data_dir, straight, *run, "--save_every_n_steps", "2", "--save_state"))
    resumed = tmp_path / "resumed"
    state = str(straight / "net-step00000002-state")
    train_network.main(network_args(model_dir, data_dir, resumed, *run, "--resume", state))
    final, _ = load_safetensors(straight / "net.safetensors")
    again, metadata = load_safetensors(resumed / "net.safetensors")
    assert final.keys() == again.keys() and len(final) == 3 * (TE_MODULES + UNET_MODULES + CONV_EXTRA)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert metadata["ss_network_module"] == "networks.dylora" and metadata["ss_network_dim"] == "4"
    half, _ = load_safetensors(straight / "net-step00000002.safetensors")
    assert any(not torch.equal(half[k], final[k]) for k in final)  # steps 3-4 did train
    tiny_lr = [
        "--max_train_steps",
        "1",
        "--learning_rate",
        "1e-9",
        "--network_weights",
        str(straight / "net.safetensors"),
    ]
    loaded = tmp_path / "loaded"
    train_network.main(network_args(model_dir, data_dir, loaded, *run[:-2], *tiny_lr))
    cont, _ = load_safetensors(loaded / "net.safetensors")
    assert cont.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(cont[key], final[key], rtol=0, atol=1e-6)
    # sd-scripts' extract_lora_from_dylora: the unit (2) comes from the file's ss_network_args; rank 4 -> one file
    model = ["--model", str(straight / "net.safetensors")]
    extract_lora_from_dylora.main([*model, "--save_to", str(tmp_path / "x.ckpt")])
    assert sorted(p.name for p in tmp_path.glob("x*")) == ["x-0002.ckpt"]
    extract_lora_from_dylora.main([*model, "--save_to", str(tmp_path / "y.safetensors"), "--unit", "1"])
    assert sorted(p.name for p in tmp_path.glob("y*")) == [f"y-000{r}.safetensors" for r in (1, 2, 3)]
    cuts = {3: load_safetensors(tmp_path / "y-0003.safetensors")[0], 2: torch.load(tmp_path / "x-0002.ckpt")}
    for rank, cut in cuts.items():
        assert cut.keys() == final.keys()
        for key, value in final.items():
            expected = value[:rank] if "lora_down" in key else value[:, :rank] if "lora_up" in key else value
            assert torch.equal(cut[key], expected), key
    meta = load_safetensors(tmp_path / "y-0003.safetensors")[1]
    assert meta["ss_network_dim"] == "3" and meta["ss_training_comment"].startswith("split from DyLoRA, rank 4 to 3")
