"""The SDXL family: detection, SGM single-file round trips, every save format, v-prediction markers, the tiny
preset and text conditioning checked against diffusers' own ``StableDiffusionXLPipeline.encode_prompt``."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.components import Components
from library.models.detect import CONFIG_KEY, clean_config
from library.models.family import checkpoint_family, diffusers_family, families, family_named, size_batch
from library.models.load import load_model, read_checkpoint
from library.models.save import save_model
from library.models.scratch import scratch_model
from library.models.sd import SD1, SD2
from library.models.sdxl import SDXL, time_ids
from library.models.tiny import make_tiny_model, tiny_model, tiny_presets
from library.text.encode import TextEncodingSettings

CAPTIONS = ["a photo of sks dog", "a red car on a rainy street, " * 12]


@pytest.fixture(scope="module")
def tiny() -> Components:
    return tiny_model(SDXL)


def _state(components: Components) -> dict[str, torch.Tensor]:
    out = {}
    for name, model in (("unet", components.unet), ("vae", components.vae)):
        out.update({f"{name}.{k}": v for k, v in model.state_dict().items()})
    for name, model in zip(SDXL.text_encoder_folders, components.text_encoders):
        out.update({f"{name}.{k}": v for k, v in model.state_dict().items()})
    return out


def _assert_same_weights(a: Components, b: Components) -> None:
    left, right = _state(a), _state(b)
    assert sorted(left) == sorted(right)
    different = [k for k in left if left[k].dtype != right[k].dtype or not torch.equal(left[k], right[k])]
    assert different == []


def test_sdxl_is_registered_first_with_its_tiny_preset():
    assert families() == (SDXL, SD2, SD1) and family_named("sdxl") is SDXL
    assert tiny_presets() == ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
    assert SDXL.text_encoder_folders == ("text_encoder", "text_encoder_2")
    assert SDXL.tokenizer_folders == ("tokenizer", "tokenizer_2") and not SDXL.v2


def test_single_file_keys_tell_sdxl_from_sd(tiny: Components):
    keys = set(SDXL.to_checkpoint(tiny))
    assert checkpoint_family(keys) == (SDXL, "CLIP ViT-L and OpenCLIP ViT-bigG text encoder keys (SDXL)")
    assert checkpoint_family({k for k in keys if not k.startswith("conditioner.embedders.1.")}) is None
    assert checkpoint_family({k for k in keys if not k.startswith("model.diffusion_model.")}) is None
    for v2, family in ((False, SD1), (True, SD2)):
        sd = make_tiny_model(v2=v2)
        assert checkpoint_family(set(sd.family.to_checkpoint(sd)))[0] is family


def test_diffusers_configs_tell_sdxl_from_sd(tiny: Components):
    clip_l = tiny.text_encoders[0].config.to_dict()
    assert diffusers_family({"unet": dict(tiny.unet.config), "text_encoder": clip_l}) is SDXL
    assert diffusers_family({"text_encoder": clip_l, "text_encoder_2": {"hidden_act": "gelu"}}) is SDXL
    sd1 = make_tiny_model()
    assert diffusers_family({"unet": dict(sd1.unet.config), "text_encoder": sd1.text_encoder.config.to_dict()}) is SD1


def test_sgm_layout_fuses_qkv_and_transposes_the_projection(tiny: Components):
    sgm = SDXL.to_checkpoint(tiny)
    clip_g = tiny.text_encoders[1]
    p = "conditioner.embedders.1.model."
    assert torch.equal(sgm[p + "text_projection"], clip_g.text_projection.weight.T)
    assert sgm[p + "text_projection"].shape == (32, 16)
    attention = clip_g.text_model.encoder.layers[2].self_attn
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(sgm[p + "transformer.resblocks.2.attn.in_proj_weight"], fused)
    assert torch.equal(sgm[p + "positional_embedding"], clip_g.text_model.embeddings.position_embedding.weight)
    assert sgm[p + "logit_scale"].item() == pytest.approx(math.log(100.0))
    clip_l = tiny.text_encoders[0]
    key = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(sgm[key], clip_l.final_layer_norm.weight)
    assert torch.equal(sgm["model.diffusion_model.label_emb.0.0.weight"], tiny.unet.add_embedding.linear_1.weight)
    assert "v_pred" not in sgm


def test_diffusers_to_single_file_to_diffusers_is_exact(tiny: Components, tmp_path):
    save_model(tiny, tmp_path / "a", "diffusers_safetensors")
    first = load_model(tmp_path / "a")
    save_model(first, tmp_path / "b.safetensors", "safetensors")
    second = load_model(tmp_path / "b.safetensors")
    save_model(second, tmp_path / "c", "diffusers")
    third = load_model(tmp_path / "c")
    for loaded in (first, second, third):
        assert loaded.family is SDXL and loaded.tokenizers[1].pad_token_id == 0
        _assert_same_weights(tiny, loaded)
    assert clean_config(third.unet.config) == clean_config(tiny.unet.config)


def test_single_file_to_diffusers_to_single_file_is_exact(tiny: Components, tmp_path):
    save_model(tiny, tmp_path / "a.safetensors", "safetensors")
    save_model(load_model(tmp_path / "a.safetensors"), tmp_path / "b", "diffusers")
    save_model(load_model(tmp_path / "b"), tmp_path / "c.safetensors", "safetensors")
    before, after = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "c.safetensors")
    assert sorted(before) == sorted(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


@pytest.mark.parametrize("save_as", ["ckpt", "safetensors", "diffusers", "diffusers_safetensors"])
@pytest.mark.parametrize("precision", [None, "fp16"])
def test_every_format_and_precision_loads_back(tiny: Components, tmp_path, save_as, precision):
    path = tmp_path / {"ckpt": "m.ckpt", "safetensors": "m.safetensors"}.get(save_as, "m")
    save_model(tiny, path, save_as, precision)
    loaded = load_model(path, dtype=torch.float16 if precision else torch.float32)
    assert loaded.family is SDXL and not loaded.v_parameterization
    if precision is None:
        _assert_same_weights(tiny, loaded)
    else:
        clip_g = loaded.text_encoders[1]
        assert clip_g.text_projection.weight.dtype == torch.float16
        assert torch.equal(clip_g.text_projection.weight, tiny.text_encoders[1].text_projection.weight.half())


def test_single_file_without_our_configs_loads_from_shapes(tiny: Components, tmp_path):
    save_model(tiny, tmp_path / "m.safetensors", "safetensors")
    tensors, metadata = read_checkpoint(tmp_path / "m.safetensors")
    assert CONFIG_KEY in metadata
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    loaded = load_model(tmp_path / "bare.safetensors")
    assert any("inferred from tensor shapes" in note for note in loaded.notes)
    _assert_same_weights(tiny, loaded)
    for key in ("transformer_layers_per_block", "attention_head_dim", "addition_time_embed_dim", "norm_num_groups"):
        assert _plain(loaded.unet.config[key]) == _plain(tiny.unet.config[key])
    assert loaded.vae.config.scaling_factor == 0.13025
    for ours, theirs in zip(loaded.text_encoders, tiny.text_encoders):
        for key in ("num_attention_heads", "hidden_act", "projection_dim", "num_hidden_layers"):
            assert getattr(ours.config, key) == getattr(theirs.config, key)
    latents, steps = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    cond = SDXL.text_encoding(TextEncodingSettings())(
        tiny.text_encoders, tiny.tokenizers, CAPTIONS, size_batch(64, 64, 2)
    )
    with torch.no_grad():
        assert torch.equal(cond.predict(loaded.unet, latents, steps), cond.predict(tiny.unet, latents, steps))


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def _bare_file(tiny: Components, tmp_path, extra: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    tensors = dict(SDXL.to_checkpoint(tiny))
    tensors.update(extra)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_v_prediction_markers_are_read(tiny: Components, tmp_path, caplog):
    marked = _bare_file(tiny, tmp_path, {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    loaded = load_model(marked)
    assert loaded.v_parameterization and loaded.scheduler.config.prediction_type == "v_prediction"
    assert any("'v_pred' key" in note and "'ztsnr' key" in note for note in loaded.notes)
    assert not load_model(marked, v_parameterization=False).v_parameterization  # the flag wins, with a warning
    spec = _bare_file(tiny, tmp_path, {}, {"modelspec.prediction_type": "v"})
    assert load_model(spec).v_parameterization
    plain = _bare_file(tiny, tmp_path, {})
    assert not load_model(plain).v_parameterization and load_model(plain, v_parameterization=True).v_parameterization


def test_v_prediction_models_save_the_marker(tmp_path):
    model = tiny_model(SDXL, v_parameterization=True)
    assert "v_pred" in SDXL.to_checkpoint(model)
    save_model(model, tmp_path / "v.safetensors", "safetensors")
    tensors, _ = read_checkpoint(tmp_path / "v.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    assert load_model(tmp_path / "bare.safetensors").v_parameterization


def test_tiny_presets_and_scratch_models(tiny: Components):
    assert load_model("tiny-sdxl").family is SDXL
    fresh = scratch_model("tiny-sdxl", seed=1)
    assert fresh.family is SDXL and [t.pad_token_id for t in fresh.tokenizers] == [49407, 0]
    config = fresh.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == 16 + 6 * config.addition_time_embed_dim
    assert config.cross_attention_dim == sum(t.config.hidden_size for t in fresh.text_encoders)
    assert [type(t).__name__ for t in fresh.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [t.config.hidden_act for t in fresh.text_encoders] == ["quick_gelu", "gelu"]
    size = sum(p.numel() * 4 for m in (fresh.unet, fresh.vae, *fresh.text_encoders) for p in m.parameters())
    assert size < 17e6  # float32 bytes; two 49408-token embeddings are 80% of it


def test_metadata_names_and_pipeline(tiny: Components):
    assert SDXL.base_model_version(False) == SDXL.base_model_version(True) == "sdxl_base_v1-0"
    assert SDXL.modelspec_architecture(True) == "stable-diffusion-xl-v1-base"
    assert SDXL.default_resolution(False) == 1024 and SDXL.latent_scale(tiny.vae) == 0.13025
    assert isinstance(tiny.to_pipeline(), StableDiffusionXLPipeline)
    with pytest.raises(ValueError, match="text_encoders"):
        _ = tiny.text_encoder


def test_time_ids_come_from_the_batch_sizes():
    batch = {"original_sizes_hw": [(768, 1024), (512, 512)], "crop_top_lefts": [(0, 32), (16, 0)]}
    batch["target_sizes_hw"] = torch.tensor([[832, 1216], [512, 512]])
    expected = torch.tensor([[768, 1024, 0, 32, 832, 1216], [512, 512, 16, 0, 512, 512]], dtype=torch.float32)
    assert torch.equal(time_ids(batch, 2), expected)
    with pytest.raises(ValueError, match="size_batch"):
        time_ids(None, 2)
    with pytest.raises(ValueError, match="3 captions"):
        time_ids(batch, 3)


def test_conditioning_matches_diffusers_encode_prompt(tiny: Components):
    encoding = SDXL.text_encoding(TextEncodingSettings())
    sizes = {"original_sizes_hw": [(96, 64), (64, 64)], "crop_top_lefts": [(8, 0), (0, 0)]}
    sizes["target_sizes_hw"] = [(64, 64), (64, 64)]
    with torch.no_grad():
        cond = encoding(tiny.text_encoders, tiny.tokenizers, CAPTIONS, sizes)
        embeds, _, pooled, _ = tiny.to_pipeline().encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False
        )
    added = cond.unet_kwargs["added_cond_kwargs"]
    assert cond.hidden_states.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 16)
    torch.testing.assert_close(cond.hidden_states, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert added["time_ids"].tolist() == [[96, 64, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


def test_pooled_output_is_the_projected_first_eos_state(tiny: Components):
    clip_g, tokenizer = tiny.text_encoders[1], tiny.tokenizers[1]
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        final = clip_g(ids).last_hidden_state
        cond = SDXL.text_encoding(TextEncodingSettings())(
            tiny.text_encoders, tiny.tokenizers, CAPTIONS, size_batch(8, 8, 2)
        )
    eos = [row.tolist().index(49407) for row in ids]
    by_hand = torch.stack([final[i, eos[i]] @ clip_g.text_projection.weight.T for i in range(2)])
    torch.testing.assert_close(cond.unet_kwargs["added_cond_kwargs"]["text_embeds"], by_hand, rtol=0, atol=1e-6)


def test_long_captions_chunk_and_pool_from_the_first_chunk(tiny: Components):
    long = SDXL.text_encoding(TextEncodingSettings(max_token_length=150), cached=False)
    short = SDXL.text_encoding(TextEncodingSettings(), cached=False)
    with torch.no_grad():
        a = long(tiny.text_encoders, tiny.tokenizers, CAPTIONS, size_batch(8, 8, 2))
        b = short(tiny.text_encoders, tiny.tokenizers, CAPTIONS, size_batch(8, 8, 2))
    assert a.hidden_states.shape == (2, 152, 64)
    pooled_long, pooled_short = (c.unet_kwargs["added_cond_kwargs"]["text_embeds"] for c in (a, b))
    close = {"rtol": 0, "atol": 1e-6}  # batches of 4 and 2 rows may round differently
    # the first chunk is the 77-token encoding (a long caption's is cut and ends in EOS, as truncation does)
    torch.testing.assert_close(pooled_long, pooled_short, **close)
    torch.testing.assert_close(a.hidden_states[:, :76], b.hidden_states[:, :76], **close)
    second_chunk = a.hidden_states[1, 76:151]
    assert (second_chunk - a.hidden_states[0, 76:151]).abs().max() > 1e-2  # the long caption's second chunk is text


def test_weighted_captions_scale_token_states_as_sd_scripts(tiny: Components):
    plain = SDXL.text_encoding(TextEncodingSettings(), cached=False)
    weighted = SDXL.text_encoding(TextEncodingSettings(weighted_captions=True))
    with torch.no_grad():
        a = plain(tiny.text_encoders, tiny.tokenizers, ["a dog on grass"], size_batch(8, 8, 1))
        b = weighted(tiny.text_encoders, tiny.tokenizers, ["a (dog:1.5) on grass"], size_batch(8, 8, 1))
    scale = torch.ones(77)
    scale[2] = 1.5  # BOS, "a", "dog"
    torch.testing.assert_close(b.hidden_states[0], a.hidden_states[0] * scale[:, None], rtol=0, atol=1e-6)
    assert torch.equal(
        a.unet_kwargs["added_cond_kwargs"]["text_embeds"], b.unet_kwargs["added_cond_kwargs"]["text_embeds"]
    )


def test_missing_text_encoder_is_a_user_error(tiny: Components, tmp_path):
    tensors = {k: v for k, v in SDXL.to_checkpoint(tiny).items() if not k.startswith("conditioner.")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(UserError, match="no text encoder weights"):
        load_model(tmp_path / "unet.safetensors")


def test_vae_override_and_tokenizer_cache(tiny: Components, tmp_path):
    save_model(tiny, tmp_path / "m", "diffusers_safetensors")
    other = tiny_model(SDXL, seed=5)
    save_model(other, tmp_path / "other", "diffusers_safetensors")
    loaded = load_model(tmp_path / "m", vae=tmp_path / "other", tokenizer_cache_dir=tmp_path / "tok")
    assert torch.equal(loaded.vae.encoder.conv_in.weight, other.vae.encoder.conv_in.weight)
    assert SDXL.latent_scale(loaded.vae) == 0.13025
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(SDXL.tokenizer_cache_names)
    again = load_model("tiny-sdxl", tokenizer_cache_dir=tmp_path / "tok")
    assert [t.pad_token_id for t in again.tokenizers] == [49407, 0]


def test_repo_id_loads_sdxl_from_the_hub_cache_offline(tiny: Components, tmp_path, monkeypatch):
    """A hub id whose snapshot is an SDXL diffusers folder (text_encoder_2, tokenizer_2) loads offline as SDXL."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--someorg--tiny-sdxl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_model(tiny, repo / "snapshots" / commit, "diffusers_safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("someorg/tiny-sdxl")
    assert loaded.family.name == "sdxl" and loaded.source == "someorg/tiny-sdxl"
    _assert_same_weights(tiny, loaded)
    assert loaded.tokenizers[1].pad_token == "!"
