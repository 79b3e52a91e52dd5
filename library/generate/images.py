"""Render batches of images (each from its own seed) and write them as sd-scripts' gen_img.py does: PNG files
``im_<time>_<index:03d>_<seed>.png`` (or ``im_<index:06d>.png``) with the prompt, seed, sampler, steps and scale
in PNG text chunks, plus the networks used."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.io import atomic_path
from library.models.components import Components
from library.models.family import size_batch
from library.sampling.samplers import make_sampler
from library.text.encode import TextEncodingSettings


@dataclass(frozen=True)
class ImageRequest:
    """One image to make: text, size, sampling settings and its seed (noise is drawn from it on the CPU, so the
    same seed gives the same image whatever the batch or device)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    seed: int

    def batch_key(self) -> tuple[Any, ...]:
        """Images with equal keys can be denoised in one batch."""
        return (self.width, self.height, self.steps, self.scale, self.sampler)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generators} if "generator" in accepted else {}


def _initial_noise(requests: Sequence[ImageRequest], shape: tuple[int, ...]) -> tuple[torch.Tensor, list]:
    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


@torch.no_grad()
def render(
    components: Components, requests: Sequence[ImageRequest], text: TextEncodingSettings, device: torch.device
) -> list[Image.Image]:
    """Denoise ``requests`` (all with one ``batch_key``) together and decode them; classifier-free guidance when the
    scale is above 1, as sd-scripts' sampling does."""
    first = requests[0]
    count = len(requests)
    unet, vae = components.unet, components.vae
    encode = components.family.text_encoding(text, cached=False)
    captions = [r.prompt for r in requests] + [r.negative_prompt for r in requests]
    conditioning = encode(
        components.text_encoders, components.tokenizers, captions, size_batch(first.height, first.width, 2 * count)
    )
    guided = first.scale > 1.0
    order = list(range(count, 2 * count)) + list(range(count)) if guided else list(range(count))
    context = conditioning.rows(order).to(device, unet.dtype)  # [negatives, prompts] as diffusers
    scheduler = make_sampler(first.sampler, components.scheduler.config, components.prediction_type, steps=first.steps)
    scheduler.set_timesteps(first.steps, device=device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (unet.config.in_channels, first.height // factor, first.width // factor)
    noise, generators = _initial_noise(requests, shape)
    latents = noise.to(device) * scheduler.init_noise_sigma
    extra = _step_kwargs(scheduler, generators)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = context.predict(unet, model_input.to(unet.dtype), t).float()
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + first.scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, **extra).prev_sample
    scale = components.family.latent_scale(vae)
    pixels = vae.decode((latents / scale).to(device, vae.dtype)).sample.float()
    arrays = ((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def png_info(request: ImageRequest, networks: Sequence[str]) -> PngInfo:
    """sd-scripts' PNG text chunks (``prompt``, ``seed``, ``sampler``, ``steps``, ``scale``, ``negative-prompt``)
    plus ``networks``: the files used as ``name:weight``, comma-separated."""
    info = PngInfo()
    info.add_text("prompt", request.prompt)
    info.add_text("seed", str(request.seed))
    info.add_text("sampler", request.sampler)
    info.add_text("steps", str(request.steps))
    info.add_text("scale", str(request.scale))
    info.add_text("negative-prompt", request.negative_prompt)
    if networks:
        info.add_text("networks", ", ".join(networks))
    return info


def image_file_name(index: int, seed: int, timestamp: str, sequential: bool) -> str:
    """sd-scripts' names: ``im_<time>_<index:03d>_<seed>.png``; ``--sequential_file_name``: ``im_<index:06d>.png``
    (``index`` counts from 1 over the whole run, where sd-scripts restarts it for every batch)."""
    return f"im_{index:06d}.png" if sequential else f"im_{timestamp}_{index:03d}_{seed}.png"


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    """Write ``image`` as a PNG atomically (a crash leaves no half-written file)."""
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
