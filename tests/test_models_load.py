"""Loading models from every source, detecting SD1/SD2/v-prediction, replacing the VAE, refusing bad input."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.convert import ldm_state_dict, vae_to_ldm
from library.models.load import load_model, load_vae
from library.models.save import save_model
from library.models.tiny import make_tiny_model


def _same_module(a, b, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}.{k}"


def _assert_same_weights(a, b, parts=("unet", "vae", "text_encoder")) -> None:
    for part in parts:
        _same_module(getattr(a, part), getattr(b, part), part)


def _foreign_file(components, path, metadata=None, extra=None) -> None:
    """An LDM single file as other tools write it: no stored configs, only tensors (+ optional metadata)."""
    c = components
    sd = {k: v.contiguous().clone() for k, v in ldm_state_dict(c.unet, c.vae, c.text_encoder, c.family.v2).items()}
    sd.update(extra or {})
    save_file(sd, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    model = make_tiny_model(v2=False)
    folder = tmp_path_factory.mktemp("sd1") / "model"
    save_model(model, folder, "diffusers_safetensors")
    return model, folder


def test_diffusers_folder_loads_with_tokenizer_and_detected_type(sd1_dir, tmp_path):
    model, folder = sd1_dir
    loaded = load_model(folder)
    _assert_same_weights(model, loaded)
    assert not loaded.family.v2 and loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    sd2 = make_tiny_model(v2=True)
    save_model(sd2, tmp_path / "sd2", "diffusers")
    loaded2 = load_model(tmp_path / "sd2", dtype=torch.float16)
    assert loaded2.family.v2 and loaded2.v_parameterization
    assert loaded2.tokenizer.pad_token_id == 0
    assert {p.dtype for p in loaded2.unet.parameters()} == {torch.float16}
    assert torch.equal(loaded2.text_encoder.final_layer_norm.weight, sd2.text_encoder.final_layer_norm.weight.half())


def test_repo_id_loads_from_the_hub_cache_offline(sd1_dir, tmp_path, monkeypatch):
    model, folder = sd1_dir
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("someorg/tiny-sd")
    _assert_same_weights(model, loaded)
    assert loaded.source == "someorg/tiny-sd"
    with pytest.raises(UserError, match=r"^someorg/not-there: cannot get this model from the Hugging Face Hub"):
        load_model("someorg/not-there")


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_single_file_loads_bit_identically(tmp_path, v2, ext):
    model = make_tiny_model(v2=v2)
    path = tmp_path / f"model.{ext}"
    save_model(model, path, ext)
    loaded = load_model(path)
    _assert_same_weights(model, loaded)
    assert (loaded.family.v2, loaded.v_parameterization) == (v2, v2)
    assert loaded.tokenizer.pad_token_id == (0 if v2 else 49407)


def test_foreign_sd1_file_gets_its_config_from_shapes(tmp_path):
    model = make_tiny_model()
    _foreign_file(model, tmp_path / "foreign.safetensors")
    loaded = load_model(tmp_path / "foreign.safetensors")
    _assert_same_weights(model, loaded)
    cfg = loaded.unet.config
    assert list(cfg.block_out_channels) == [16, 32, 32, 32] and cfg.layers_per_block == 2
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg.cross_attention_dim == 32 and cfg.attention_head_dim == 8 and not cfg.use_linear_projection
    assert cfg.norm_num_groups == 16  # not readable from shapes: largest power of two <= 32 dividing every width
    assert list(loaded.vae.config.block_out_channels) == [8, 16, 16, 16] and loaded.vae.config.layers_per_block == 1
    te = loaded.text_encoder.config
    assert (te.hidden_size, te.num_hidden_layers, te.intermediate_size, te.hidden_act) == (32, 4, 64, "quick_gelu")
    assert any("inferred" in n for n in loaded.notes)


def test_foreign_sd2_files_detect_v_prediction_from_keys_or_modelspec(tmp_path, caplog):
    model = make_tiny_model(v2=True)
    cases = {
        "plain": ({}, {}, False),
        "comfy": ({}, {"v_pred": torch.zeros(0)}, True),
        "spec-arch": ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, True),
        "spec-512": ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, False),
        "spec-pred": ({"modelspec.prediction_type": "v"}, {}, True),
    }
    for name, (metadata, extra, expected) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _foreign_file(model, path, metadata=metadata, extra=extra)
        with caplog.at_level(logging.WARNING, logger="library.models.detect"):
            caplog.clear()
            loaded = load_model(path)
        assert loaded.family.v2 and loaded.v_parameterization is expected, name
        assert loaded.scheduler.config.prediction_type == ("v_prediction" if expected else "epsilon")
        assert loaded.unet.config.use_linear_projection and loaded.text_encoder.config.num_hidden_layers == 4
        assert ("cannot tell whether" in caplog.text) is (name == "plain"), name
    _assert_same_weights(model, loaded)


def test_flags_that_contradict_the_weights_warn(tmp_path, caplog):
    sd1 = make_tiny_model(v2=False)
    save_model(sd1, tmp_path / "sd1.safetensors", "safetensors")
    with caplog.at_level(logging.WARNING, logger="library.models.detect"):
        loaded = load_model(tmp_path / "sd1.safetensors", v2=True, v_parameterization=True)
    assert "--v2 is set but the weights are SD 1.x" in caplog.text
    assert "--v_parameterization is set but the model says it is epsilon-prediction; using the flag" in caplog.text
    assert not loaded.family.v2 and loaded.v_parameterization
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.models.detect"):
        agreeing = load_model(tmp_path / "sd1.safetensors", v2=False, v_parameterization=False)
    assert caplog.text == "" and not agreeing.v_parameterization


def test_tokenizer_cache_dir_saves_then_reuses(tmp_path):
    model = make_tiny_model()
    save_model(model, tmp_path / "m.safetensors", "safetensors")
    cache = tmp_path / "tok"
    load_model(tmp_path / "m.safetensors", tokenizer_cache_dir=cache)
    saved = cache / "openai_clip-vit-large-patch14"
    assert (saved / "tokenizer_config.json").is_file()
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(saved)
    tok.add_tokens(["<sks>"])
    tok.save_pretrained(saved)
    again = load_model(tmp_path / "m.safetensors", tokenizer_cache_dir=cache)
    assert len(again.tokenizer) == 49409 and again.tokenizer.model_max_length == 77


def test_vae_is_replaced_from_files_and_folders(sd1_dir, tmp_path):
    model, folder = sd1_dir
    other = make_tiny_model(seed=1)
    ldm = {k: v.contiguous() for k, v in vae_to_ldm(other.vae.state_dict(), other.vae.config).items()}
    save_file(ldm, str(tmp_path / "with_prefix.safetensors"))
    bare = {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}
    torch.save({"state_dict": bare}, tmp_path / "bare.ckpt")
    save_model(other, tmp_path / "other", "diffusers_safetensors")
    for vae in (tmp_path / "with_prefix.safetensors", tmp_path / "other"):
        loaded = load_model(folder, vae=vae)
        _assert_same_weights(other, loaded, parts=("vae",))
        _assert_same_weights(model, loaded, parts=("unet", "text_encoder"))
        assert loaded.vae.config.norm_num_groups == 8
    for vae in (tmp_path / "bare.ckpt", tmp_path / "other" / "vae"):
        loaded_vae = load_vae(vae, reference=model.vae.config)
        _same_module(other.vae, loaded_vae, "vae")
    assert load_vae(tmp_path / "bare.ckpt").config.norm_num_groups == 8  # inferred from shapes: 8 divides all widths


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    model = make_tiny_model()
    sd = {
        k: v.contiguous().clone() for k, v in ldm_state_dict(model.unet, model.vae, model.text_encoder, False).items()
    }
    torch.save({"state_dict": sd, "payload": Payload()}, tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(UserError, match=r"evil.ckpt: this pickle checkpoint wants to run code"):
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()
    loaded = load_model(tmp_path / "evil.ckpt", allow_unsafe_pickle=True)
    assert marker.exists()
    _assert_same_weights(model, loaded)


def test_bad_inputs_give_one_line_user_errors(tmp_path):
    model = make_tiny_model()
    save_model(model, tmp_path / "good.safetensors", "safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "notmodel.safetensors"))
    (tmp_path / "model.txt").write_text("hello")
    save_model(model, tmp_path / "good.ckpt", "ckpt")
    ckpt = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a pickle")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing.safetensors": r"missing.safetensors: model file or folder not found",
        tmp_path / "cut.safetensors": r"cut.safetensors: truncated safetensors file",
        tmp_path / "notmodel.safetensors": r"notmodel.safetensors: not a Stable Diffusion 1.x/2.x/XL checkpoint",
        tmp_path / "model.txt": r"model.txt: unknown model file extension '.txt'",
        tmp_path / "cut.ckpt": r"cut.ckpt: not a readable checkpoint \(truncated, corrupt or not a pickle\)",
        tmp_path / "garbage.ckpt": r"garbage.ckpt: not a readable checkpoint",
        tmp_path / "empty": r"empty: not a diffusers Stable Diffusion folder \(missing unet/config.json\)",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            load_model(path)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"garbage.ckpt: not a readable checkpoint"):
        load_model(tmp_path / "garbage.ckpt", allow_unsafe_pickle=True)
    with pytest.raises(UserError, match=r"notmodel.safetensors: not a VAE in LDM layout"):
        load_vae(tmp_path / "notmodel.safetensors")
    with pytest.raises(UserError, match=r"nope: VAE file or folder not found; check --vae"):
        load_model(tmp_path / "good.safetensors", vae=tmp_path / "nope")


def test_builtin_tiny_model_names_build_on_the_spot(tmp_path, monkeypatch):
    sd2 = load_model("tiny-sd2")
    assert sd2.family.v2 and sd2.v_parameterization and sd2.unet.config.use_linear_projection
    reference = make_tiny_model()
    sd1 = load_model("tiny-sd1")
    assert not sd1.family.v2 and not sd1.v_parameterization
    _assert_same_weights(reference, sd1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-sd1").mkdir()
    with pytest.raises(UserError, match=r"tiny-sd1: not a diffusers Stable Diffusion folder"):
        load_model("tiny-sd1")  # a real folder of that name wins over the built-in


def test_a_bundled_model_missing_from_the_install_is_one_line(monkeypatch, tmp_path):
    """``tiny-shapes`` names the model shipped in library/data; an install without it says so in one line."""
    from importlib import resources

    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    with pytest.raises(UserError, match=r"^tiny-shapes: the bundled model is missing from this install \(.+\); "):
        load_model("tiny-shapes")
