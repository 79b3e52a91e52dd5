"""The model-family seam: detection, the family of every loaded model, metadata names and text conditioning."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from library.errors import UserError
from library.models.components import Components
from library.models.detect import CONFIG_KEY
from library.models.family import (
    Conditioning,
    ModelFamily,
    checkpoint_family,
    diffusers_family,
    families,
    family_named,
)
from library.models.load import load_model
from library.models.save import save_model
from library.models.scratch import scratch_model
from library.models.sd import SD1, SD2
from library.models.tiny import make_tiny_model, tiny_presets
from library.text.encode import TextEncodingSettings, encode_prompts

CAPTIONS = ["a photo of sks dog", "a (red:1.3) car on a [rainy] street", "a photo of sks dog"]


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def tiny(request) -> Components:
    return make_tiny_model(v2=request.param)


def test_registry_lists_the_families_by_name():
    assert families()[1:] == (SD2, SD1) and families()[0].name == "sdxl"
    assert family_named("sd1") is SD1 and family_named("sd2") is SD2
    with pytest.raises(UserError, match=r"unknown model family 'sd3'; use one of sdxl, sd2, sd1"):
        family_named("sd3")
    assert tiny_presets() == ("tiny-sd1", "tiny-sd2", "tiny-sdxl")


@pytest.mark.parametrize("family", [SD1, SD2], ids=["sd1", "sd2"])
def test_every_family_has_one_entry_per_text_encoder(family: ModelFamily):
    count = len(family.text_encoder_folders)
    assert (count, len(family.text_encoder_classes), len(family.tokenizer_folders)) == (1, 1, 1)
    assert len(family.tokenizer_cache_names) == 1
    assert family.text_encoder_folders == ("text_encoder",) and family.tokenizer_folders == ("tokenizer",)


def test_tiny_models_carry_their_family(tiny: Components):
    family = SD2 if tiny.family.v2 else SD1
    assert tiny.family is family and tiny.family.v2 is family.v2
    assert tiny.text_encoders == [tiny.text_encoder] and tiny.tokenizers == [tiny.tokenizer]
    assert tiny.source == f"tiny-{family.name}"
    assert isinstance(tiny.to_pipeline(), StableDiffusionPipeline)
    assert family.latent_scale(tiny.vae) == 0.18215


def test_single_file_keys_tell_the_family(tiny: Components):
    keys = set(tiny.family.to_checkpoint(tiny))
    if tiny.family.v2:
        assert checkpoint_family(keys) == (SD2, "OpenCLIP text encoder keys (SD 2.x)")
    else:
        assert checkpoint_family(keys) == (SD1, "CLIP ViT-L text encoder keys (SD 1.x)")
    text_prefix = "cond_stage_model."
    assert checkpoint_family({k for k in keys if not k.startswith(text_prefix)}) is None
    assert checkpoint_family({k for k in keys if not k.startswith("model.diffusion_model.")}) is None


def test_diffusers_configs_tell_the_family(tiny: Components):
    configs = {"unet": dict(tiny.unet.config), "text_encoder": tiny.text_encoder.config.to_dict()}
    assert diffusers_family(configs) is tiny.family
    assert diffusers_family({"unet": dict(tiny.unet.config)}) is SD1  # no text encoder config: CLIP's quick GELU


@pytest.mark.parametrize("save_as", ["safetensors", "diffusers_safetensors"])
def test_loaded_models_have_the_family_of_their_weights(tiny: Components, tmp_path, save_as):
    path = tmp_path / ("model.safetensors" if save_as == "safetensors" else "model")
    save_model(tiny, path, save_as)
    loaded = load_model(path)
    assert loaded.family is tiny.family and loaded.v_parameterization is tiny.v_parameterization
    assert loaded.scheduler.config.prediction_type == tiny.prediction_type


def test_single_files_store_the_same_config_keys_as_before(tiny: Components, tmp_path):
    save_model(tiny, tmp_path / "m.safetensors", "safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        stored = json.loads(f.metadata()[CONFIG_KEY])
    assert sorted(stored) == ["prediction_type", "text_encoder", "unet", "v2", "vae"]
    assert stored["v2"] is tiny.family.v2 and stored["prediction_type"] == tiny.prediction_type


def test_builtin_and_scratch_models_have_their_family():
    assert load_model("tiny-sd1").family is SD1 and load_model("tiny-sd2").family is SD2
    assert scratch_model("tiny-sd1", seed=0).family is SD1
    fresh = scratch_model("tiny-sd2", seed=0, v_parameterization=True)
    assert fresh.family is SD2 and fresh.v_parameterization and fresh.tokenizer.pad_token_id == 0


@pytest.mark.parametrize(
    ("family", "v_pred", "version", "architecture", "resolution"),
    [
        (SD1, False, "sd_v1", "stable-diffusion-v1", 512),
        (SD1, True, "sd_v1_v", "stable-diffusion-v1", 512),
        (SD2, False, "sd_v2", "stable-diffusion-v2-512", 512),
        (SD2, True, "sd_v2_v", "stable-diffusion-v2-768-v", 768),
    ],
)
def test_metadata_names_are_sd_scripts_ones(family, v_pred, version, architecture, resolution):
    assert family.base_model_version(v_pred) == version
    assert family.modelspec_architecture(v_pred) == architecture
    assert family.default_resolution(v_pred) == resolution
    assert family.noise_scheduler(v_pred).config.prediction_type == ("v_prediction" if v_pred else "epsilon")


@pytest.mark.parametrize(
    "options",
    [{}, {"clip_skip": 2}, {"max_token_length": 150, "weighted": True}, {"max_token_length": 225, "clip_skip": 2}],
    ids=["plain", "clip-skip", "long-weighted", "long-clip-skip"],
)
def test_text_conditioning_equals_the_encode_path(tiny: Components, options):
    expected = encode_prompts(tiny.text_encoder, tiny.tokenizer, CAPTIONS, v2=tiny.family.v2, **options)
    settings = TextEncodingSettings(
        options.get("max_token_length"), options.get("clip_skip"), weighted_captions=options.get("weighted", False)
    )
    encoding = tiny.family.text_encoding(settings)
    with torch.no_grad():
        first = encoding(tiny.text_encoders, tiny.tokenizers, CAPTIONS)
        again = encoding(tiny.text_encoders, tiny.tokenizers, CAPTIONS, batch={"captions": CAPTIONS})
    assert dict(first.unet_kwargs) == {}
    assert torch.equal(first.hidden_states, expected) and torch.equal(again.hidden_states, expected)
    assert len(encoding.cache) == 2  # each distinct caption tokenized once
    uncached = tiny.family.text_encoding(settings, cached=False)
    assert uncached.cache is None
    assert torch.equal(uncached(tiny.text_encoders, tiny.tokenizers, CAPTIONS).hidden_states, expected)


def test_conditioning_moves_and_predicts_like_the_plain_unet_call(tiny: Components):
    states = torch.randn(2, 77, 32)
    extra = {"added": {"embeds": torch.randn(2, 4), "ids": torch.tensor([1, 2])}}
    moved = Conditioning(states, extra).to("cpu", torch.bfloat16)
    assert moved.hidden_states.dtype == torch.bfloat16 and moved.unet_kwargs["added"]["embeds"].dtype == torch.bfloat16
    assert moved.unet_kwargs["added"]["ids"].dtype == torch.int64
    swapped = Conditioning(states, extra).rows([1, 0])
    assert torch.equal(swapped.hidden_states, states.flip(0))
    assert torch.equal(swapped.unet_kwargs["added"]["ids"], torch.tensor([2, 1]))
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        expected = tiny.unet(latents, timesteps, states).sample
        assert torch.equal(Conditioning(states).predict(tiny.unet, latents, timesteps), expected)


def test_one_encoder_accessors_refuse_several_encoders(tiny: Components):
    two = Components(
        unet=tiny.unet,
        vae=tiny.vae,
        text_encoders=[tiny.text_encoder, tiny.text_encoder],
        tokenizers=[tiny.tokenizer, tiny.tokenizer],
        scheduler=tiny.scheduler,
        family=tiny.family,
    )
    with pytest.raises(ValueError, match=r"has 2 text_encoders; use Components.text_encoders"):
        _ = two.text_encoder
    with pytest.raises(ValueError, match=r"has 2 tokenizers; use Components.tokenizers"):
        _ = two.tokenizer
