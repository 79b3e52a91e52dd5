"""networks.lora's algos (lora, locon, loha, lokr, full; DoRA, Tucker, LoKr factors) on the tiny SD1 model: the exact
keys and shapes of the saved file, merging equals applying at runtime, loading back, and training with exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

import train_network
from library.errors import UserError
from library.io import load_safetensors
from library.models.load import load_model
from networks import lokr as lokr_module
from networks import lora
from networks.adapters import factorization
from tests.test_train_network import assert_same_tensors
from tests.training import network_args, write_frog_dataset

# name: (network_dim, network_alpha, --network_args); conv layers at conv_dim 2, conv_alpha 1 unless said
CONFIGS = {
    "lora": (4, 2, ["conv_dim=2", "conv_alpha=1"]),
    "locon-dora": (4, 2, ["algo=locon", "conv_dim=2", "conv_alpha=1", "dora_wd=true"]),
    "locon-tucker": (4, 2, ["algo=locon", "conv_dim=2", "conv_alpha=1", "use_tucker=true"]),
    "loha": (4, 2, ["algo=loha", "conv_dim=2", "conv_alpha=1"]),
    "loha-tucker-dora": (4, 2, ["algo=loha", "conv_dim=2", "conv_alpha=1", "use_tucker=true", "dora_wd=true"]),
    "lokr": (4, 2, ["algo=lokr", "conv_dim=2", "conv_alpha=1"]),
    "lokr-factor2-tucker": (4, 2, ["algo=lokr", "factor=2", "conv_dim=2", "conv_alpha=1", "use_tucker=true"]),
    "lokr-decompose-both": (1, 1, ["algo=lokr", "decompose_both=true", "conv_dim=1", "conv_alpha=1"]),
    "lokr-full-matrix-dora": (4, 2, ["algo=lokr", "full_matrix=true", "dora_wd=true", "conv_dim=2", "conv_alpha=1"]),
    "full": (4, 2, ["algo=full", "conv_dim=2"]),
}
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 64 -> 16 with bias
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 16 -> 16, 3x3
# exact tensors of those two modules, from LyCORIS's shape rules (tests/test_lycoris_interop.py checks them against
# lycoris-lora itself): LoKr splits 16 = 4 x 4 and 64 = 8 x 8 (factor -1), 16 = 2 x 8 and 64 = 2 x 32 (factor 2)
GOLDEN = {
    "lora": {
        LINEAR: {"lora_down.weight": (4, 64), "lora_up.weight": (16, 4), "alpha": ()},
        CONV: {"lora_down.weight": (2, 16, 3, 3), "lora_up.weight": (16, 2, 1, 1), "alpha": ()},
    },
    "locon-dora": {
        LINEAR: {"lora_down.weight": (4, 64), "lora_up.weight": (16, 4), "alpha": (), "dora_scale": (16, 1)},
        CONV: {
            "lora_down.weight": (2, 16, 3, 3),
            "lora_up.weight": (16, 2, 1, 1),
            "alpha": (),
            "dora_scale": (16, 1, 1, 1),
        },
    },
    "locon-tucker": {
        LINEAR: {"lora_down.weight": (4, 64), "lora_up.weight": (16, 4), "alpha": ()},
        CONV: {
            "lora_down.weight": (2, 16, 1, 1),
            "lora_mid.weight": (2, 2, 3, 3),
            "lora_up.weight": (16, 2, 1, 1),
            "alpha": (),
        },
    },
    "loha": {
        LINEAR: {"hada_w1_a": (16, 4), "hada_w1_b": (4, 64), "hada_w2_a": (16, 4), "hada_w2_b": (4, 64), "alpha": ()},
        CONV: {"hada_w1_a": (16, 2), "hada_w1_b": (2, 144), "hada_w2_a": (16, 2), "hada_w2_b": (2, 144), "alpha": ()},
    },
    "loha-tucker-dora": {
        LINEAR: {
            **{"hada_w1_a": (16, 4), "hada_w1_b": (4, 64), "hada_w2_a": (16, 4), "hada_w2_b": (4, 64)},
            **{"alpha": (), "dora_scale": (16, 1)},
        },
        CONV: {
            **{"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 16), "hada_w1_b": (2, 16)},
            **{"hada_t2": (2, 2, 3, 3), "hada_w2_a": (2, 16), "hada_w2_b": (2, 16)},
            **{"alpha": (), "dora_scale": (16, 1, 1, 1)},
        },
    },
    "lokr": {
        LINEAR: {"lokr_w1": (4, 8), "lokr_w2": (4, 8), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_w2": (4, 4, 3, 3), "alpha": ()},
    },
    "lokr-factor2-tucker": {
        LINEAR: {"lokr_w1": (2, 2), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 32), "alpha": ()},
        CONV: {"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8), "alpha": ()},
    },
    "lokr-decompose-both": {
        LINEAR: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 8), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 8), "alpha": ()},
        CONV: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 36), "alpha": ()},
    },
    "lokr-full-matrix-dora": {
        LINEAR: {"lokr_w1": (4, 8), "lokr_w2": (4, 8), "alpha": (), "dora_scale": (16, 1)},
        CONV: {"lokr_w1": (4, 4), "lokr_w2": (4, 4, 3, 3), "alpha": (), "dora_scale": (16, 1, 1, 1)},
    },
    "full": {
        LINEAR: {"diff": (16, 64), "diff_b": (16,)},
        CONV: {"diff": (16, 16, 3, 3), "diff_b": (16,)},
    },
}
# the saved alpha: LoKr with both halves full saves the rank (its scale is 1), full has none
ALPHAS = {"lokr": (4.0, 2.0), "lokr-full-matrix-dora": (4.0, 2.0), "lokr-decompose-both": (1.0, 1.0)}


def kwargs_of(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args)


def build(c, name: str, multiplier: float = 1.0):
    """A copy of the tiny model's text encoder and UNet with the ``name`` network built on them (not applied)."""
    te, unet = copy.deepcopy(c.text_encoder), copy.deepcopy(c.unet)
    dim, alpha, args = CONFIGS[name]
    return te, unet, lora.create_network(multiplier, dim, alpha, None, te, unet, **kwargs_of(args))


def randomize(network: torch.nn.Module, seed: int = 5) -> None:
    """Non-zero weights everywhere (DoRA magnitudes stay near the base norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("dora_scale"):
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def forward(c, te, unet) -> torch.Tensor:
    """UNet noise prediction for fixed latents, conditioned on the text encoder's output for fixed tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, te.config.vocab_size, (1, 77), generator=gen)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), te(ids)[0]).sample


@pytest.fixture(scope="module")
def sd1():
    from library.models.tiny import make_tiny_model

    return make_tiny_model()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_keys_and_shapes_are_lycoris(sd1, name, tmp_path):
    te, unet, net = build(sd1, name)
    net.save_weights(tmp_path / "n.safetensors", None, {})
    tensors, metadata = load_safetensors(tmp_path / "n.safetensors")
    for module, golden in GOLDEN[name].items():
        got = {k[len(module) + 1 :]: tuple(v.shape) for k, v in tensors.items() if k.startswith(module + ".")}
        assert got == golden, module
    if name in ALPHAS:
        assert (tensors[f"{LINEAR}.alpha"].item(), tensors[f"{CONV}.alpha"].item()) == ALPHAS[name]
    elif name != "full":
        assert (tensors[f"{LINEAR}.alpha"].item(), tensors[f"{CONV}.alpha"].item()) == (2.0, 1.0)
    assert metadata["sshs_model_hash"]
    te_keys = [k for k in tensors if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merging_equals_applying_and_files_load_back(sd1, name, tmp_path):
    """At multiplier 0.7: the model with the network hooked in and the model with the file merged give the same
    output within 1e-5 (outputs are of order 1); the file loads back into a network built from the same args."""
    te, unet, net = build(sd1, name, multiplier=0.7)
    randomize(net)
    net.apply_to(te, unet)
    net.eval()
    path = tmp_path / f"{name}.safetensors"
    net.save_weights(path, None, {})
    applied = forward(sd1, te, unet)
    assert (applied - forward(sd1, sd1.text_encoder, sd1.unet)).abs().max() > 1e-2  # the network does something
    te2, unet2 = copy.deepcopy(sd1.text_encoder), copy.deepcopy(sd1.unet)
    merger, weights = lora.create_network_from_weights(0.7, str(path), None, te2, unet2)
    assert merger.is_mergeable()
    merger.merge_to(te2, unet2, weights)
    torch.testing.assert_close(forward(sd1, te2, unet2), applied, atol=1e-5, rtol=0)
    te3, unet3, again = build(sd1, name)
    again.apply_to(te3, unet3)
    again.load_weights(path)
    saved = load_safetensors(path)[0]
    assert_same_tensors({k: v for k, v in again.state_dict().items()}, saved)


def test_a_file_of_another_algo_is_refused_with_what_to_pass(sd1, tmp_path):
    te, unet, net = build(sd1, "loha")
    net.save_weights(tmp_path / "loha.safetensors", None, {})
    te, unet, other = build(sd1, "lokr")
    with pytest.raises(UserError, match=r"_k_proj is loha in the file but lokr here; pass the file's algo"):
        other.load_weights(tmp_path / "loha.safetensors")
    te, unet, plain = build(sd1, "lora")
    dora = tmp_path / "dora.safetensors"
    build(sd1, "locon-dora")[2].save_weights(dora, None, {})
    with pytest.raises(UserError, match=r"is locon in the file but lora here; pass the file's algo \(and dora_wd\)"):
        plain.load_weights(dora)


def test_bad_args_are_refused_in_one_line(sd1):
    c = sd1
    cases = {
        "algo=lycoris": "--network_args algo=lycoris: unknown; networks.lora trains lora, locon, loha, lokr, full",
        "algo=full dora_wd=true": "DoRA is for algo=lora/locon/loha/lokr, not full",
        "algo=loha loraplus_lr_ratio=4": "LoRA+ needs an up matrix, which algo=loha has not",
        "dora_wd=maybe": "--network_args dora_wd=maybe: give true or false",
    }
    for args, message in cases.items():
        with pytest.raises(UserError, match=message.replace("+", r"\+")):
            lora.create_network(1.0, 4, 1, None, c.text_encoder, c.unet, **kwargs_of(args.split()))
    with pytest.raises(UserError, match="networks.lokr trains algo=lokr; drop algo=loha"):
        lokr_module.create_network(1.0, 4, 1, None, c.text_encoder, c.unet, algo="loha")


def test_lokr_factorization_is_lycoris():
    """The split of a dimension into LoKr's two halves is lycoris-lora's (its docstring table is stale for 360)."""
    from lycoris.functional.general import factorization as lycoris_factorization

    for factor in (-1, 1, 2, 3, 4, 8, 16):
        for dim in (1, 2, 7, 12, 16, 64, 127, 128, 250, 320, 360, 512, 640, 768, 1024, 1280, 2048):
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)
    assert [factorization(d) for d in (128, 250, 360, 1024)] == [(8, 16), (10, 25), (18, 20), (32, 32)]


def test_block_dims_max_norm_and_loraplus_work_with_adapters(sd1):
    c = sd1
    dims = ",".join(["2"] * 12 + ["0"] + ["2"] * 12)
    net = lora.create_network(1.0, 4, 2, None, c.text_encoder, c.unet, algo="loha", block_dims=dims)
    unet_dims = {m.lora_name: m.lora_dim for m in net.unet_loras}
    assert set(unet_dims.values()) == {2} and not any("mid_block" in n for n in unet_dims)
    randomize(net)
    before = [m.diff_weight().norm().item() for m in net.loras]
    limit = sorted(before)[len(before) // 2]  # half the modules are over it
    scaled, mean, top = net.apply_max_norm_regularization(limit, "cpu")
    after = [m.diff_weight().norm().item() for m in net.loras]
    assert scaled == sum(b > limit for b in before) and top == pytest.approx(limit, rel=1e-5)
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, limit), rel=1e-4)
    dora = lora.create_network(1.0, 4, 2, None, c.text_encoder, c.unet, dora_wd="true", loraplus_lr_ratio="4")
    groups, names = dora.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-4, 4e-4, 1e-3, 4e-3]
    assert all(p.shape[1] == 4 for p in groups[3]["params"])  # the lora_up weights (out, rank[, 1, 1])


# training: 2 steps straight (state saved after step 1), then resumed from step 1: the files must be bitwise equal
TRAINED = {
    "locon-dora": ["--network_args", "algo=locon", "dora_wd=true", "conv_dim=2", "rank_dropout=0.2"],
    "loha-tucker": ["--network_module", "networks.loha", "--network_args", "use_tucker=true", "conv_dim=2"],
    "lokr": ["--network_module", "networks.lokr", "--network_args", "factor=2", "conv_dim=2", "module_dropout=0.3"],
    "full": ["--network_args", "algo=full", "preset=attn-only"],
}
KEYS_TRAINED = {
    "locon-dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha-tucker": {f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")} | {"alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},  # small layers get a full w2
    "full": {"diff", "diff_b"},
}


@pytest.fixture(scope="module")
def frog_data(tmp_path_factory):
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trains_through_train_network_with_step_exact_resume(model_dir, frog_data, tmp_path, name):
    run = ["--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state", *TRAINED[name]]
    straight = tmp_path / "straight"
    train_network.main(network_args(model_dir, frog_data, straight, *run))
    resumed = tmp_path / "resumed"
    train_network.main(
        network_args(model_dir, frog_data, resumed, *run, "--resume", str(straight / "lora-step00000001-state"))
    )
    final = load_safetensors(straight / "lora.safetensors")[0]
    assert_same_tensors(load_safetensors(resumed / "lora.safetensors")[0], final)
    first = load_safetensors(straight / "lora-step00000001.safetensors")[0]
    assert any(not torch.equal(first[k], final[k]) for k in final)  # step 2 changed the weights
    assert {k.split(".", 1)[1] for k in final} == KEYS_TRAINED[name]
    c = load_model(model_dir)
    loaded, _ = lora.create_network_from_weights(1.0, str(straight / "lora.safetensors"), None, c.text_encoder, c.unet)
    loaded.apply_to(c.text_encoder, c.unet)
    loaded.load_weights(straight / "lora.safetensors")
    assert_same_tensors(dict(loaded.state_dict()), final)
