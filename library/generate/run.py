"""gen_img.py's run: load the model, put the networks on, turn prompts into seeded image requests, render them in
batches with a progress bar, and write the images (and X/Y grids) atomically."""

from __future__ import annotations

import glob
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from library.engine.attention import apply_attention, choose_attention, xformers_installed
from library.errors import UserError
from library.generate.flags import GenSettings
from library.generate.grid import make_grid
from library.generate.images import ImageRequest, image_file_name, png_info, render, save_png
from library.generate.networks import NetworkFile, applied, file_label, module_for, parse_options
from library.models.components import Components
from library.models.load import load_model
from library.prep.common import pick_device
from library.sampling.prompts import MAX_SIZE, line_to_prompt_dict, load_prompts, one_line, resolve_prompt
from library.text.encode import TextEncodingSettings
from library.textual_inversion import add_tokens_to_all, expand_text, load_embedding, token_strings

logger = logging.getLogger("sdtrain")

DEFAULT_SIZE = 512  # sd-scripts' default --W/--H for SD 1.x/2.x
SDXL_DEFAULT_SIZE = 1024
SEED_LIMIT = 2**32 - 1  # sd-scripts draws seeds with randint(0, 2**32 - 1)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenReport:
    """What a run wrote: image files, grid files, and how long it took."""

    images: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def summary(self, outdir: str) -> str:
        seconds = time.monotonic() - self.started
        rate = f", {len(self.images) / seconds:.2f} images/s" if self.images and seconds > 0 else ""
        grids = f" and {len(self.grids)} grid(s) ({', '.join(p.name for p in self.grids)})" if self.grids else ""
        return f"gen_img: {len(self.images)} images{grids} written to {outdir} in {seconds:.1f} s{rate}"


def _load(settings: GenSettings, device: torch.device) -> Components:
    dtype = DTYPES[settings.dtype]
    c = load_model(
        settings.ckpt,
        v2=settings.v2,
        v_parameterization=settings.v_parameterization,
        vae=settings.vae,
        tokenizer_cache_dir=settings.tokenizer_cache_dir,
        dtype=dtype,
    )
    if settings.no_half_vae:
        c.vae.to(dtype=torch.float32)
    for module in (c.unet, c.vae, *c.text_encoders):
        module.to(device).eval().requires_grad_(False)
    if settings.xformers and device.type != "cuda":
        logger.warning("--xformers: xformers is unavailable on CPU; using PyTorch SDPA attention")
        choice = "sdpa"
    else:
        choice = choose_attention(
            xformers=settings.xformers, mem_eff_attn=False, device=device, have_xformers=xformers_installed()
        )
    apply_attention(c.unet, choice)
    for note in c.notes:
        logger.info(note)
    return c


def _add_embeddings(components: Components, paths: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Load textual inversion embeddings as new tokens named after their files (sd-scripts' rule); returns each
    token string with the tokens it expands to in prompts."""
    replacements = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--textual_inversion_embeddings {path}: file not found")
        embedding = load_embedding(path)
        token = Path(path).stem
        strings = token_strings(token, embedding.shape[0])
        for encoder in components.text_encoders:
            width = encoder.get_input_embeddings().weight.shape[1]
            if embedding.shape[1] != width:
                raise UserError(
                    f"--textual_inversion_embeddings {path}: vectors of width {embedding.shape[1]}, this model's text "
                    f"encoder needs {width}; is it an embedding for another model type?"
                )
        flag = f"--textual_inversion_embeddings {path}"
        added = add_tokens_to_all(components.tokenizers, components.text_encoders, strings, flag)
        for tokens, encoder in zip(added, components.text_encoders):
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[list(tokens.ids)] = embedding.to(weight.device, weight.dtype)
        replacements.append((token, strings))
        logger.info(f"textual inversion {path}: token '{token}' ({len(strings)} vectors)")
    return replacements


def _raw_prompts(settings: GenSettings) -> list[dict[str, Any]]:
    if settings.prompt is not None:
        return [line_to_prompt_dict(settings.prompt, "--prompt")]
    path = Path(settings.from_file)
    if not path.is_file():
        raise UserError(f"--from_file {path}: file not found")
    if path.suffix.lower() not in (".txt", ".toml", ".json"):
        raise UserError(f"--from_file {path}: unsupported file type; use a .txt, .toml or .json prompt file")
    notes: list[str] = []
    prompts = load_prompts(path, notes)
    for note in notes:
        logger.warning(note)
    if not prompts:
        raise UserError(f"--from_file {path}: no prompts in the file")
    return prompts


def _size(value: int | None, flag: str, default: int) -> int:
    if value is None:
        return default
    if not 1 <= value <= MAX_SIZE:
        raise UserError(f"{flag} {value}: must be 1 to {MAX_SIZE} pixels")
    return value


def _base_request(
    settings: GenSettings, raw: dict[str, Any], replacements, size: int
) -> tuple[ImageRequest, int | None]:
    """The request a prompt dict asks for (without its seed yet) and the seed its ``--d`` gives, if any; ``size``
    is the default side in pixels."""
    defaults: dict[str, Any] = {
        "width": _size(settings.width, "--W", size),
        "height": _size(settings.height, "--H", size),
        "sample_steps": settings.steps,
    }
    if "guidance_scale" not in raw:
        defaults["scale"] = settings.scale
    resolved = resolve_prompt({**defaults, **raw}, settings.sampler)
    prompt, negative = resolved.prompt, resolved.negative_prompt or ""
    for token, strings in replacements:
        prompt, negative = expand_text(prompt, token, strings), expand_text(negative, token, strings)
    request = ImageRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=resolved.width,
        height=resolved.height,
        steps=resolved.sample_steps,
        scale=resolved.scale,
        sampler=resolved.sampler,
        seed=0,
    )
    return request, resolved.seed


def _seed_source(settings: GenSettings, prompt_count: int):
    """sd-scripts' seeds: ``--seed`` itself for a single image, else draws from ``random.Random(--seed)`` (fresh
    randomness without ``--seed``), so a re-run with the same flags makes the same images."""
    single = prompt_count == 1 and settings.images_per_prompt == 1 and settings.n_iter == 1
    if settings.seed is not None and single:
        return lambda: settings.seed
    rng = random.Random(settings.seed) if settings.seed is not None else random.Random()
    return lambda: rng.randint(0, SEED_LIMIT)


def build_requests(
    settings: GenSettings, raws: Sequence[dict[str, Any]], replacements, size: int
) -> list[ImageRequest]:
    """Every image of the run in order: for each iteration, each prompt, ``--images_per_prompt`` images; the first
    image of a prompt with ``--d`` uses that seed, the others draw from the run's seed source."""
    next_seed = _seed_source(settings, len(raws))
    requests = []
    for _ in range(settings.n_iter):
        for raw in raws:
            base, fixed = _base_request(settings, raw, replacements, size)
            for k in range(settings.images_per_prompt):
                seed = fixed if (fixed is not None and k == 0) else next_seed()
                requests.append(replace(base, seed=seed))
    return requests


def _text_settings(settings: GenSettings) -> TextEncodingSettings:
    return TextEncodingSettings(settings.max_token_length, settings.clip_skip, weighted_captions=True)


def _batches(requests: Sequence[ImageRequest], size: int) -> list[list[int]]:
    """Indices of consecutive requests grouped into batches of at most ``size`` with one ``batch_key``."""
    batches: list[list[int]] = []
    for index, request in enumerate(requests):
        last = batches[-1] if batches else None
        if last and len(last) < size and requests[last[0]].batch_key() == request.batch_key():
            last.append(index)
        else:
            batches.append([index])
    return batches


class _Writer:
    """Renders batches and saves each image with its metadata under the run's running index."""

    def __init__(self, settings: GenSettings, components: Components, device: torch.device, total: int):
        self.settings, self.components, self.device = settings, components, device
        self.outdir = Path(settings.outdir)
        self.timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        self.report = GenReport()
        self.total = total
        self.bar: tqdm | None = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def run(self, requests: Sequence[ImageRequest], networks: Sequence[str]) -> list[Image.Image]:
        images: list[Image.Image] = [None] * len(requests)  # type: ignore[list-item]
        if self.bar is None:  # started with the first images, so errors before them print no bar
            self.bar = tqdm(total=self.total, desc="gen_img", unit="img", smoothing=0.0, dynamic_ncols=True)
        for batch in _batches(requests, self.settings.batch_size):
            rendered = render(self.components, [requests[i] for i in batch], _text_settings(self.settings), self.device)
            for i, image in zip(batch, rendered):
                images[i] = image
                index = len(self.report.images) + 1
                name = image_file_name(index, requests[i].seed, self.timestamp, self.settings.sequential_file_name)
                path = self.outdir / name
                save_png(image, path, png_info(requests[i], networks))
                self.report.images.append(path)
            self.bar.update(len(batch))
        return images


def _network_files(settings: GenSettings) -> list[NetworkFile]:
    return [
        NetworkFile(path, module, mul, parse_options(args, f"--network_args #{i + 1}"))
        for i, (module, path, mul, args) in enumerate(
            zip(settings.network_modules, settings.network_weights, settings.network_muls, settings.network_args)
        )
    ]


def expand_files(patterns: Sequence[str]) -> list[str]:
    """``--xy_lora_files``: each argument a file or a glob (sorted); a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            found = sorted(glob.glob(pattern))
            if not found:
                raise UserError(f"--xy_lora_files {pattern}: the pattern matches no file")
            files.extend(found)
        elif not Path(pattern).is_file():
            raise UserError(f"--xy_lora_files {pattern}: file not found")
        else:
            files.append(pattern)
    return files


def _grid_configs(settings: GenSettings, specs: list[NetworkFile]) -> tuple[list[str], list[str] | None, list]:
    """(x labels, y labels or None when the prompts are the y axis, [(x, y, network files)] per cell config)."""
    weights, files = settings.xy_lora_weights, settings.xy_lora_files
    if weights is not None and files is not None:
        paths = expand_files(files)
        configs = [
            (x, y, [*specs, NetworkFile(p, None, w)]) for y, p in enumerate(paths) for x, w in enumerate(weights)
        ]
        return [f"weight {w:g}" for w in weights], [file_label(p) for p in paths], configs
    if weights is not None:
        first, rest = specs[0], specs[1:]
        configs = [(x, None, [replace(first, multiplier=w), *rest]) for x, w in enumerate(weights)]
        return [f"{first.name} {w:g}" for w in weights], None, configs
    paths = expand_files(files or ())
    configs = [(x, None, [*specs, NetworkFile(p, None, 1.0)]) for x, p in enumerate(paths)]
    return [file_label(p) for p in paths], None, configs


def _run_grid(settings: GenSettings, c: Components, device, dtype, prompts: list[ImageRequest]) -> GenReport:
    x_labels, y_labels, configs = _grid_configs(settings, _network_files(settings))
    if len({(r.width, r.height) for r in prompts}) > 1:
        raise UserError("--xy_lora_*: every prompt of a grid must have one size; drop --w/--h from the prompt lines")
    writer = _Writer(settings, c, device, len(configs) * len(prompts))
    cells: dict[tuple[int, int | None, int], Image.Image] = {}
    for spec in {s.path: s for _, _, specs in configs for s in specs}.values():
        module_for(spec)  # every file exists and is readable before any image is made
    for x, y, specs in configs:
        with applied(c, specs, merge=settings.network_merge, device=device, dtype=dtype) as labels:
            for p, image in enumerate(writer.run(prompts, labels)):
                cells[(x, y, p)] = image
    writer.close()
    outdir = Path(settings.outdir)
    prompt_labels = [one_line(r.prompt, 200) for r in prompts]
    if y_labels is None:
        grids = [([[cells[(x, None, p)] for x in range(len(x_labels))] for p in range(len(prompts))], prompt_labels)]
    else:
        grids = [
            ([[cells[(x, y, p)] for x in range(len(x_labels))] for y in range(len(y_labels))], y_labels)
            for p in range(len(prompts))
        ]
    for n, (rows, labels) in enumerate(grids):
        suffix = f"_{n:02d}" if len(grids) > 1 else ""
        path = outdir / f"grid_{writer.timestamp}{suffix}.png"
        save_png(make_grid(rows, x_labels, labels), path)
        writer.report.grids.append(path)
    return writer.report


def generate(settings: GenSettings) -> GenReport:
    """Make every image (or grid) ``settings`` asks for; returns what was written."""
    device = pick_device(settings.device, only_cpu_or_cuda=False)
    dtype = DTYPES[settings.dtype]
    raws = _raw_prompts(settings)
    components = _load(settings, device)
    sdxl = components.family.name == "sdxl"
    if settings.sdxl and not sdxl:
        raise UserError(f"--sdxl: {settings.ckpt} is an {components.family.description} model; drop --sdxl")
    size = SDXL_DEFAULT_SIZE if sdxl else DEFAULT_SIZE
    replacements = _add_embeddings(components, settings.textual_inversion_embeddings)
    Path(settings.outdir).mkdir(parents=True, exist_ok=True)
    if settings.xy_lora_weights is not None or settings.xy_lora_files is not None:
        prompts = build_requests(settings, raws, replacements, size)
        report = _run_grid(settings, components, device, dtype, prompts)
    else:
        requests = build_requests(settings, raws, replacements, size)
        writer = _Writer(settings, components, device, len(requests))
        specs = _network_files(settings)
        with applied(components, specs, merge=settings.network_merge, device=device, dtype=dtype, restore=False) as n:
            writer.run(requests, n)
        writer.close()
        report = writer.report
    logger.info(report.summary(settings.outdir))
    return report
