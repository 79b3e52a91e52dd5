"""``--network_module lycoris.kohya`` with LyCORIS's default and ``full`` presets and kohya_ss's SD1.5 presets.

On the tiny SD1 UNet the ``full`` preset's rules (the blocks Transformer2DModel, ResnetBlock2D, Downsample2D and
Upsample2D, plus conv_in, conv_out and time_embedding.linear_1/2) take every Linear and Conv2d of the UNet:
25 down resnet layers (3 per resnet, one 16->32 shortcut), 3 downsamplers, 6 mid resnet layers, 48 up resnet layers
(12 resnets, each with a shortcut), 3 upsamplers, 16 transformers x 12 (proj_in/out, 2 x q/k/v/out, 2 feed-forward
linears) and the 4 named layers: 281 modules. The text encoder's CLIPAttention/CLIPMLP give 4 layers x 6 = 24.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train_network
from library.cli import run_cli
from library.errors import UserError
from library.io import load_safetensors
from library.models.tiny import make_tiny_model
from library.recipes import lycoris_compat
from library.recipes.network import parse_network_args
from tests.training import network_args, write_frog_dataset

kohya = pytest.importorskip("lycoris.kohya")
Network = kohya.LycorisNetworkKohya

UNET_MODULES = 281
TE_MODULES = 24
# train_norm=True adds the norms inside the targeted blocks: 2 per ResnetBlock2D (22), the GroupNorm of each
# Transformer2DModel and 3 LayerNorms per transformer block (16 each); conv_norm_out is outside every target
UNET_MODULES_WITH_NORMS = UNET_MODULES + 2 * 22 + 16 + 3 * 16
ALGO_CLASSES = {"locon": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule", "ia3": "IA3Module"}
ALGO_CLASSES["glora"] = "GLoRAModule"

# kohya_ss (presets/lora/*sd15*.json) -> LoRA_type, dims and the --network_args kohya_gui/lora_gui.py builds from
# them (its GUI defaults filled in: preset full, conv_dim 1, conv_alpha 1, train_on_input True, ...); the file
# "sd15 - GLoRA v1.0.json" is a LoKr preset
KOHYA_SS_SD15 = {
    "ia3-sd15": (64, 64, "preset=full conv_dim=64 conv_alpha=64 train_on_input=True algo=ia3"),
    "iA3-Prodigy-sd15": (1024, 1024, "preset=full conv_dim=1 conv_alpha=1 train_on_input=True algo=ia3"),
    "loha-sd15": (
        32,
        16,
        "preset=full conv_dim=8 conv_alpha=4 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=loha train_norm=False",
    ),
    "lokr-sd15": (
        64,
        64,
        "preset=full conv_dim=64 conv_alpha=64 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0 factor=-1 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
        "algo=lokr train_norm=False",
    ),
    "sd15 - EDG_LoConOptiSettings": (
        64,
        64,
        "preset=full conv_dim=32 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0.0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon train_norm=False",
    ),
    "sd15 - EDG_LoHaOptiSettings": (
        32,
        32,
        "preset=full conv_dim=32 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0.0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=loha train_norm=False",
    ),
    "sd15 - LoKR v1.0": (
        100000,
        1,
        "preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0 factor=6 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
        "algo=lokr train_norm=False",
    ),
    "sd15 - LoKr v1.1 / GLoRA v1.0": (
        100000,
        1,
        "preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0 factor=6 use_cp=True use_scalar=False decompose_both=True rank_dropout_scale=True "
        "algo=lokr train_norm=True",
    ),
    "sd15 - LoKr v2.0": (
        100000,
        1,
        "preset=full conv_dim=100000 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
        "module_dropout=0 factor=6 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
        "algo=lokr train_norm=False",
    ),
}


def build(model, dim: int = 4, alpha: float = 1, **kwargs):
    return lycoris_compat.create_network(kohya, 1.0, dim, alpha, model.vae, model.text_encoder, model.unet, **kwargs)


def lora_names(modules: list[nn.Module]) -> list[str]:
    return [m.lora_name for m in modules]


def unet_names(unet: nn.Module, kinds: tuple[type, ...]) -> set[str]:
    return {"lora_unet_" + p.replace(".", "_") for p, m in unet.named_modules() if isinstance(m, kinds)}


def te_names() -> set[str]:
    layers = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    return {f"lora_te_encoder_layers_{i}_{layer}" for i in range(4) for layer in layers}


def lycoris_state() -> dict[str, object]:
    """LyCORIS's preset class attributes (deep copies)."""
    return {key: copy.deepcopy(getattr(Network, attr)) for key, attr in lycoris_compat.PRESET_ATTRIBUTES.items()}


@pytest.mark.parametrize("algo", sorted(ALGO_CLASSES))
@pytest.mark.parametrize("preset", [None, "full"])
def test_default_and_full_presets_build_every_module_once(sd1, algo, preset):
    network = build(sd1, algo=algo, **({} if preset is None else {"preset": preset}))
    names = lora_names(network.unet_loras + network.text_encoder_loras)
    assert len(names) == len(set(names)) == UNET_MODULES + TE_MODULES
    assert set(lora_names(network.unet_loras)) == unet_names(sd1.unet, (nn.Linear, nn.Conv2d))
    assert len(network.unet_loras) == UNET_MODULES
    assert set(lora_names(network.text_encoder_loras)) == te_names()
    assert {type(m).__name__ for m in network.unet_loras + network.text_encoder_loras} == {ALGO_CLASSES[algo]}


@pytest.mark.parametrize("name", sorted(KOHYA_SS_SD15))
def test_kohya_ss_sd15_presets_build_on_the_tiny_model(sd1, name):
    dim, alpha, args = KOHYA_SS_SD15[name]
    kwargs = parse_network_args(args.split())
    network = build(sd1, dim, alpha, neuron_dropout=None, **kwargs)
    names = lora_names(network.unet_loras + network.text_encoder_loras)
    assert len(names) == len(set(names))
    with_norms = kwargs.get("train_norm") == "True"
    assert len(network.unet_loras) == (UNET_MODULES_WITH_NORMS if with_norms else UNET_MODULES)
    kinds = (nn.Linear, nn.Conv2d) + ((nn.GroupNorm, nn.LayerNorm) if with_norms else ())
    assert set(lora_names(network.unet_loras)) == unet_names(sd1.unet, kinds) - {"lora_unet_conv_norm_out"}
    assert set(lora_names(network.text_encoder_loras)) == te_names()


def test_creations_leave_no_preset_behind_and_ignore_one_left_before(sd1):
    before = lycoris_state()
    ia3 = build(sd1, algo="ia3", preset="ia3")  # LyCORIS's ia3 preset sets a name_algo_map
    assert lycoris_state() == before
    # the ia3 preset's names (to_k, ...) are matched from the start of a module path, so none fit an SD UNet
    assert len(ia3.unet_loras) == len(ia3.text_encoder_loras) == 0
    assert len(build(sd1, algo="locon").unet_loras) == UNET_MODULES
    assert len(build(sd1, algo="locon", preset="attn-mlp").unet_loras) == 16 * 12 + 2  # + time_embedding.linear_*
    Network.apply_preset({"unet_target_module": ["Downsample2D"], "unet_target_name": [], "use_fnmatch": True})
    try:
        left = lycoris_state()
        network = build(sd1, algo="loha", preset="full")
        assert len(network.unet_loras) == UNET_MODULES
        assert lycoris_state() == left
    finally:
        Network.apply_preset(before)


def test_preset_file_reaching_time_embedding_by_class_and_name_builds_it_once(sd1, tmp_path):
    preset = tmp_path / "preset.toml"
    preset.write_text(
        'unet_target_module = ["TimestepEmbedding", "Transformer2DModel"]\n'
        'unet_target_name = ["time_embedding.linear_1", "conv_in"]\n'
        "text_encoder_target_module = []\n"
    )
    network = build(sd1, algo="lokr", preset=str(preset))
    names = lora_names(network.unet_loras)
    assert len(names) == len(set(names)) == 16 * 12 + 3
    expected = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2", "lora_unet_conv_in"}
    assert expected <= set(names)
    assert network.text_encoder_loras == []


def test_unknown_preset_or_bad_preset_file_is_a_user_error(sd1, tmp_path):
    with pytest.raises(UserError, match=r"^--network_args preset=no-such: neither a LyCORIS preset \(attn-mlp, "):
        build(sd1, algo="locon", preset="no-such")
    (tmp_path / "bad.toml").write_text('unet_targets = ["Transformer2DModel"]\n')
    with pytest.raises(UserError, match=r"not a valid LyCORIS preset file \(Unknown preset keys: unet_targets\."):
        build(sd1, algo="locon", preset=str(tmp_path / "bad.toml"))


def test_ia3_file_cannot_be_rebuilt_from_weights_and_says_so(tmp_path):
    model = make_tiny_model()
    network = build(model, algo="ia3")
    network.apply_to(model.text_encoder, model.unet, True, True)
    network.save_weights(str(tmp_path / "ia3.safetensors"), None, {})
    fresh = make_tiny_model()
    with pytest.raises(UserError, match="LyCORIS cannot rebuild a network from this file"):
        lycoris_compat.create_network_from_weights(
            kohya, 1.0, str(tmp_path / "ia3.safetensors"), fresh.vae, fresh.text_encoder, fresh.unet
        )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


def test_kohya_ss_loha_preset_trains_saves_and_loads_back(model_dir, data_dir, tmp_path):
    dim, alpha, args = KOHYA_SS_SD15["loha-sd15"]
    argv = network_args(model_dir, data_dir, tmp_path, "--max_train_steps", "2", "--network_module", "lycoris.kohya")
    argv[argv.index("--network_dim") + 1], argv[argv.index("--network_alpha") + 1] = str(dim), str(alpha)
    train_network.main([*argv, "--network_args", *args.split()])
    tensors, metadata = load_safetensors(tmp_path / "lora.safetensors")
    assert json.loads(metadata["ss_network_args"]) == parse_network_args(args.split())
    modules = {key.split(".")[0] for key in tensors}
    assert len(modules) == UNET_MODULES + TE_MODULES and len(tensors) == 5 * len(modules)
    assert {key.split(".", 1)[1] for key in tensors} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    fresh = make_tiny_model()
    network, weights = lycoris_compat.create_network_from_weights(
        kohya, 1.0, str(tmp_path / "lora.safetensors"), fresh.vae, fresh.text_encoder, fresh.unet
    )
    assert len(network.unet_loras) == UNET_MODULES and len(network.text_encoder_loras) == TE_MODULES
    network.apply_to(fresh.text_encoder, fresh.unet, True, True)
    result = network.load_state_dict(weights, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_preset_targeting_a_module_twice_is_one_line(model_dir, data_dir, tmp_path, capsys):
    preset = tmp_path / "nested.toml"
    preset.write_text('unet_target_module = ["CrossAttnDownBlock2D", "Transformer2DModel"]\nunet_target_name = []\n')
    argv = network_args(model_dir, data_dir, tmp_path, "--max_train_steps", "1", "--network_module", "lycoris.kohya")
    code = run_cli(train_network.main, [*argv, "--network_args", "algo=locon", f"preset={preset}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: --network_module lycoris.kohya: LyCORIS failed with 'duplicated lora name: ")
    assert "targets that module twice" in err[-1]


def test_missing_lycoris_package_names_the_extra_to_install(monkeypatch):
    from library.recipes.network import import_network_module

    for name in ("lycoris", "lycoris.kohya"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (lycoris.kohya may be imported already)
    with pytest.raises(UserError, match=r"pip install 'sd-trainer\[lycoris\]'"):
        import_network_module("lycoris.kohya")
