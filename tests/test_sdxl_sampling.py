"""SDXL sample images: our sampler with the SDXL family's conditioning gives the pixels of diffusers' own
StableDiffusionXLPipeline for the same prompt embeddings, size conditioning, scheduler and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.models.family import family_named, size_batch
from library.models.tiny import tiny_model
from library.sampling import SamplePrompt, SampleSettings, generate_image
from library.sampling.samplers import make_sampler
from library.text.encode import TextEncodingSettings


@pytest.fixture(scope="module")
def sdxl():
    return tiny_model(family_named("sdxl"))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _pipeline_pixels(components, request: SamplePrompt, seed: int) -> np.ndarray:
    """The request through diffusers' StableDiffusionXLPipeline, given our family's embeddings (its defaults for
    size conditioning are ours: original and target size = the image size, crop (0, 0))."""
    pipe = components.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_sampler(
        request.sampler, components.scheduler.config, components.prediction_type, steps=request.sample_steps
    )
    encode = components.family.text_encoding(TextEncodingSettings(weighted_captions=True), cached=False)
    texts = [request.prompt, request.negative_prompt or ""]
    with torch.no_grad():
        cond = encode(
            components.text_encoders, components.tokenizers, texts, size_batch(request.height, request.width, 2)
        )
    pooled = cond.unet_kwargs["added_cond_kwargs"]["text_embeds"]
    image = pipe(
        prompt_embeds=cond.hidden_states[:1],
        negative_prompt_embeds=cond.hidden_states[1:],
        pooled_prompt_embeds=pooled[:1],
        negative_pooled_prompt_embeds=pooled[1:],
        width=request.width,
        height=request.height,
        num_inference_steps=request.sample_steps,
        guidance_scale=request.scale,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return _pixels(image)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpm++_2m_karras"])
def test_samples_match_the_diffusers_sdxl_pipeline(sdxl, tmp_path, sampler):
    request = SamplePrompt(
        index=0,
        prompt="a red dog",
        negative_prompt="blurry",
        width=72,
        height=64,
        sample_steps=3,
        scale=6.0,
        sampler=sampler,
    )
    settings = SampleSettings(prompts_file=tmp_path / "p.txt", output_dir=tmp_path / "out")
    image = generate_image(sdxl, request, settings, seed=21)
    assert image.size == (72, 64)
    mine = _pixels(image)
    assert np.array_equal(mine, _pipeline_pixels(sdxl, request, 21))
    assert mine.std() > 5


def test_size_conditioning_is_the_sample_size(sdxl):
    """--w/--h become the original and target size of the time ids (crop 0, 0), as diffusers' pipeline defaults."""
    encode = sdxl.family.text_encoding(TextEncodingSettings(), cached=False)
    ids = [
        encode(sdxl.text_encoders, sdxl.tokenizers, ["a dog"], size_batch(h, w, 1)).unet_kwargs["added_cond_kwargs"]
        for h, w in ((64, 64), (128, 96))
    ]
    assert [i["time_ids"].tolist() for i in ids] == [[[64, 64, 0, 0, 64, 64]], [[128, 96, 0, 0, 128, 96]]]
