"""Generate sample images during training without disturbing it.

``sample_images`` reads the prompt file, denoises one image per prompt with the sampler each prompt names, writes
``output_dir/sample/<name>_<label>_<index>_<time>[_<seed>].png`` atomically and returns the images. The global
RNGs (python, numpy, torch CPU and CUDA), the models' train/eval flags and the VAE's device are restored
afterwards, so a run with sampling trains exactly like a run without.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from library.io import atomic_path
from library.models.components import Components
from library.models.family import Conditioning, size_batch
from library.sampling.prompts import SamplePrompt, load_prompts, one_line, resolve_prompt
from library.sampling.samplers import make_sampler
from library.text.encode import TextEncodingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSettings:
    """What sampling needs from the run's configuration (sd-scripts' flag names in comments; built from them by
    ``library.sampling.flags.SampleFlags.settings``)."""

    prompts_file: Path  # --sample_prompts
    output_dir: Path  # --output_dir
    output_name: str | None = None  # --output_name
    default_sampler: str = "ddim"  # --sample_sampler
    max_token_length: int | None = None  # --max_token_length
    clip_skip: int | None = None  # --clip_skip
    weighted: bool = True  # sd-scripts always reads (word:1.2) weights in sample prompts
    training_seed: int | None = None  # --seed
    every_n_steps: int | None = None  # --sample_every_n_steps
    every_n_epochs: int | None = None  # --sample_every_n_epochs
    at_first: bool = False  # --sample_at_first
    file_suffix: str = ""  # added to file names and tracker keys (e.g. "_noema" for --sample_without_ema)


@dataclass(frozen=True)
class Sample:
    """One generated image, where it was written, the request it answers and the seed actually used."""

    image: Image.Image
    path: Path
    prompt: SamplePrompt
    seed: int


def should_sample(
    step: int,
    epoch: int | None,
    *,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    at_first: bool,
    is_epoch_end: bool,
) -> bool:
    """sd-scripts' schedule: step 0 only with ``at_first``; ``every_n_epochs`` (checked at epoch ends, ``epoch``
    counting completed epochs from 1) overrides ``every_n_steps`` (checked after optimizer steps, not at epoch
    ends)."""
    if step == 0:
        return at_first
    if every_n_epochs is not None:
        return is_epoch_end and epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps is not None:
        return not is_epoch_end and step % every_n_steps == 0
    return False


def sample_file_name(
    output_name: str | None,
    epoch: int | None,
    step: int,
    index: int,
    timestamp: str,
    seed: int | None,
    suffix: str = "",
) -> str:
    """sd-scripts' name: ``[<output_name>_]{e<epoch:06d>|<step:06d>}_<index:02d>_<timestamp>[_<seed>].png``, with
    ``suffix`` before the extension (``_noema`` for the raw weights of an EMA run).

    The seed is in the name only when the prompt sets one (``--d``), as in sd-scripts.
    """
    prefix = "" if output_name is None else f"{output_name}_"
    label = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{label}_{index:02d}_{timestamp}{seed_suffix}{suffix}.png"


def derived_seed(training_seed: int | None, step: int, epoch: int | None, index: int) -> int:
    """A seed for a prompt without ``--d``: fixed by the training seed, the step/epoch and the prompt's position
    (so a resumed run draws the same images), or fresh entropy when training has no seed."""
    if training_seed is None:
        return random.SystemRandom().randrange(2**32)
    entropy = [training_seed % 2**64, step, 0 if epoch is None else epoch + 1, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python, numpy, torch CPU and every CUDA device's RNG state when the block ends."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode; give every submodule back its own training flag afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _on_device(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    original = next(module.parameters()).device
    if original != device:
        module.to(device)
    try:
        yield
    finally:
        if original != device:
            module.to(original)


def _encode_pair(components: Components, settings: SampleSettings, request: SamplePrompt) -> Conditioning:
    """The family's conditioning of ``[prompt, negative]`` from one call, so both have the same token length; the
    image size is the size conditioning of families that have one (SDXL: original and target size, no crop)."""
    text = TextEncodingSettings(settings.max_token_length, settings.clip_skip, weighted_captions=settings.weighted)
    encode = components.family.text_encoding(text, cached=False)
    captions = [request.prompt, request.negative_prompt or ""]
    sizes = size_batch(request.height, request.width, len(captions))
    return encode(components.text_encoders, components.tokenizers, captions, sizes)


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}


def _denoise(
    components: Components,
    request: SamplePrompt,
    conditioning: Conditioning,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Run the sampler from seeded noise to clean latents (classifier-free guidance when scale > 1)."""
    unet = components.unet
    scheduler = make_sampler(
        request.sampler, components.scheduler.config, components.prediction_type, steps=request.sample_steps
    )
    scheduler.set_timesteps(request.sample_steps, device=device)
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    shape = (1, unet.config.in_channels, request.height // factor, request.width // factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * scheduler.init_noise_sigma
    guided = request.scale > 1.0
    context = conditioning.rows([1, 0] if guided else [0]).to(device, unet.dtype)  # [negative, prompt] as diffusers
    extra = _step_kwargs(scheduler, generator)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = context.predict(unet, model_input.to(unet.dtype), t).float()
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + request.scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, **extra).prev_sample
    return latents


def _decode(components: Components, latents: torch.Tensor) -> Image.Image:
    vae = components.vae
    with _on_device(vae, latents.device):
        scale = components.family.latent_scale(vae)
        pixels = vae.decode((latents / scale).to(vae.dtype)).sample.float()
    array = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def generate_image(
    components: Components,
    request: SamplePrompt,
    settings: SampleSettings,
    seed: int,
    *,
    device: torch.device | str | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> Image.Image:
    """One image for ``request`` from ``seed`` (noise drawn by a CPU generator, so the seed means the same image
    on every device). Global RNGs and train flags are the caller's business; ``sample_images`` handles them."""
    device = torch.device(device) if device is not None else next(components.unet.parameters()).device
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        conditioning = _encode_pair(components, settings, request)
        latents = _denoise(components, request, conditioning, generator, device)
        return _decode(components, latents)


def check_prompts(settings: SampleSettings) -> list[SamplePrompt]:
    """Read, check and resolve every prompt now (at start-up), so a bad file fails before training, not hours in.

    Adjustments sd-scripts makes silently (steps clamped, sizes rounded to a multiple of 8) are logged here as
    one warning each; a file with no prompts gets a warning too."""
    notes: list[str] = []
    prompts = [resolve_prompt(raw, settings.default_sampler) for raw in load_prompts(settings.prompts_file, notes)]
    for note in notes:
        logger.warning(note)
    if not prompts:
        logger.warning(
            "--sample_prompts %s: no prompts in the file; no sample images will be made", settings.prompts_file
        )
    return prompts


def error_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` on one line, cut to ``limit`` characters (for warnings)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return one_line(text, limit)


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def sample_images(
    components: Components,
    settings: SampleSettings,
    *,
    epoch: int | None,
    step: int,
    device: torch.device | str | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    prompt_replacement: tuple[str, str] | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    timestamp: Callable[[], str] | None = None,
    keep_going: bool = True,
) -> list[Sample]:
    """Generate and save one image per prompt in ``settings.prompts_file``.

    Pass ``epoch`` (completed epochs, 0 for ``--sample_at_first``) for epoch samples, ``None`` for step samples,
    as sd-scripts does; it picks the ``e<epoch>`` or ``<step>`` file label. ``components.unet`` must be the
    unwrapped model. With several processes, process ``k`` draws prompts ``k, k+n, …``.
    ``prompt_replacement`` (old, new) rewrites prompt text (textual inversion's token strings).

    A sample must never lose the run: with ``keep_going`` (the default) a prompt whose image fails (any Exception:
    out of memory, a bad value in a file edited mid-run, …) is logged as one warning with its index and the
    error's first line, and the others are still made; a prompt file that can no longer be read skips this round
    with one warning. KeyboardInterrupt and SystemExit always propagate. ``keep_going=False`` raises instead.
    """
    when = f"step {step}" if epoch is None else f"epoch {epoch} (step {step})"
    try:
        prompts = load_prompts(settings.prompts_file)[process_index::num_processes]
    except Exception as e:
        if not keep_going:
            raise
        logger.warning("sample images at %s skipped: %s; training continues", when, error_line(e))
        return []
    results = []
    with preserved_rng(), eval_mode(components.unet, *components.text_encoders, components.vae):
        for raw in prompts:
            try:
                results.append(
                    _one_sample(
                        components,
                        settings,
                        raw,
                        epoch=epoch,
                        step=step,
                        device=device,
                        autocast=autocast,
                        prompt_replacement=prompt_replacement,
                        timestamp=timestamp,
                    )
                )
            except Exception as e:
                if not keep_going:
                    raise
                logger.warning(
                    "sample %d at %s failed: %s; no image for it, training continues",
                    raw.get("enum", 0),
                    when,
                    error_line(e),
                )
    return results


def _one_sample(
    components: Components,
    settings: SampleSettings,
    raw: dict[str, Any],
    *,
    epoch: int | None,
    step: int,
    device: torch.device | str | None,
    autocast: Callable[[], AbstractContextManager] | None,
    prompt_replacement: tuple[str, str] | None,
    timestamp: Callable[[], str] | None,
) -> Sample:
    """Generate and save the image for one prompt dict (``sample_images`` holds the RNG and train-flag guards)."""
    request = resolve_prompt(raw, settings.default_sampler)
    if prompt_replacement is not None:
        request = _replace_text(request, *prompt_replacement)
    seed = (
        request.seed if request.seed is not None else derived_seed(settings.training_seed, step, epoch, request.index)
    )
    logger.info("sample %d: %r (%s, seed %d)", request.index, request.prompt, request.sampler, seed)
    image = generate_image(components, request, settings, seed, device=device, autocast=autocast)
    stamp = timestamp() if timestamp is not None else time.strftime("%Y%m%d%H%M%S", time.localtime())
    path = (
        settings.output_dir
        / "sample"
        / sample_file_name(settings.output_name, epoch, step, request.index, stamp, request.seed, settings.file_suffix)
    )
    _save_png(image, path)
    return Sample(image=image, path=path, prompt=request, seed=seed)


def _replace_text(request: SamplePrompt, old: str, new: str) -> SamplePrompt:
    negative = None if request.negative_prompt is None else request.negative_prompt.replace(old, new)
    return replace(request, prompt=request.prompt.replace(old, new), negative_prompt=negative)
