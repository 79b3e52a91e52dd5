"""gen_img.py's flags: sd-scripts' names and defaults for the part implemented here, and a one-line refusal of the
rest (highres fix, ControlNet, img2img, …) instead of accepting and ignoring them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from library.cli import ArgumentParser
from library.config.flags import add_logging_arguments
from library.errors import UserError
from library.sampling.samplers import SAMPLER_NAMES, check_sampler_name

# sd-scripts' gen_img.py flags this tool does not implement (refused by name when given).
UNSUPPORTED_FLAGS = (
    "--zero_terminal_snr",
    "--pyramid_noise_prob",
    "--pyramid_noise_discount_range",
    "--noise_offset_prob",
    "--noise_offset_range",
    "--from_module",
    "--prompter_module_args",
    "--interactive",
    "--no_preview",
    "--image_path",
    "--mask_path",
    "--strength",
    "--use_original_file_name",
    "--original_height",
    "--original_width",
    "--original_height_negative",
    "--original_width_negative",
    "--crop_top",
    "--crop_left",
    "--vae_batch_size",
    "--vae_slices",
    "--iter_same_seed",
    "--shuffle_prompts",
    "--diffusers_xformers",
    "--opt_channels_last",
    "--network_show_meta",
    "--network_merge_n_models",
    "--network_pre_calc",
    "--network_regional_mask_max_color_codes",
    "--emb_normalize_mode",
    "--force_scheduler_zero_steps_offset",
    "--guide_image_path",
    "--highres_fix_scale",
    "--highres_fix_steps",
    "--highres_fix_strength",
    "--highres_fix_save_1st",
    "--highres_fix_latents_upscaling",
    "--highres_fix_upscaler",
    "--highres_fix_upscaler_args",
    "--highres_fix_disable_control_net",
    "--negative_scale",
    "--control_net_lllite_models",
    "--control_net_models",
    "--control_net_preps",
    "--control_net_multipliers",
    "--control_net_ratios",
    "--clip_vision_strength",
    "--ds_depth_1",
    "--ds_timesteps_1",
    "--ds_depth_2",
    "--ds_timesteps_2",
    "--ds_ratio",
    "--gradual_latent_timesteps",
    "--gradual_latent_ratio",
    "--gradual_latent_ratio_step",
    "--gradual_latent_every_n_steps",
    "--gradual_latent_s_noise",
    "--gradual_latent_unsharp_params",
)


def setup_parser(description: str | None = None) -> ArgumentParser:
    """sd-scripts' gen_img.py flags implemented here, plus ``--lora`` and the X/Y grid flags."""
    p = ArgumentParser(description=description)
    p.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from the model anyway)")
    p.add_argument("--v1", action="store_true", help="the model is SD 1.x (detected from the model anyway)")
    p.add_argument("--v2", action="store_true", help="the model is SD 2.x (detected from the model anyway)")
    p.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v)")
    p.add_argument("--prompt", type=str, default=None, help="one prompt, with inline options (--n, --w, --d, …)")
    p.add_argument(
        "--from_file", type=str, default=None, help="prompt file (.txt lines with --n --w --h --d --l --s; .toml/.json)"
    )
    p.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--outdir", type=str, default="outputs", help="folder for the images (and grids)")
    p.add_argument("--sequential_file_name", action="store_true", help="name images im_000001.png, … instead")
    p.add_argument("--n_iter", type=int, default=1, help="go through the prompts this many times")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default 512; SDXL 1024)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default 512; SDXL 1024)")
    p.add_argument("--batch_size", type=int, default=1, help="images denoised together (same size/steps/scale)")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 with --fp16/--bf16")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", type=str, default="ddim", help=f"sampler: {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument(
        "--ckpt", type=str, default=None, help="model: diffusers folder, .safetensors/.ckpt, hub id, tiny-sd1"
    )
    p.add_argument("--vae", type=str, default=None, help="VAE to use instead of the model's (file or folder)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder to cache tokenizers in")
    p.add_argument("--seed", type=int, default=None, help="seed; with several images, the seed of their seeds")
    p.add_argument("--fp16", action="store_true", help="run the models in float16")
    p.add_argument("--bf16", action="store_true", help="run the models in bfloat16")
    p.add_argument("--xformers", action="store_true", help="xformers attention (CUDA with xformers installed)")
    p.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--network_module", type=str, default=None, nargs="*", help="network module per weights file")
    p.add_argument("--network_weights", type=str, default=None, nargs="*", help="network weights files")
    p.add_argument("--network_mul", type=float, default=None, nargs="*", help="multiplier per network (default 1)")
    p.add_argument(
        "--network_args", type=str, default=None, nargs="*", help="per network: 'key=value;key=value' for its module"
    )
    p.add_argument("--network_merge", action="store_true", help="merge the networks into the weights (no hooks)")
    p.add_argument(
        "--lora",
        type=str,
        action="append",
        default=None,
        help="path[:weight] of a LoRA-family file (repeatable); the module is chosen from the file's keys",
    )
    p.add_argument(
        "--textual_inversion_embeddings", type=str, default=None, nargs="*", help="textual inversion embedding files"
    )
    p.add_argument("--clip_skip", type=int, default=None, help="use the output of the n-th last CLIP layer")
    p.add_argument(
        "--max_embeddings_multiples", type=int, default=None, help="prompt length 75 * this (1, 2 or 3) tokens"
    )
    p.add_argument(
        "--xy_lora_weights",
        type=str,
        default=None,
        help="X/Y grid, x axis: weights of the first network, e.g. 0,0.5,1 (y axis: the prompts, or --xy_lora_files)",
    )
    p.add_argument(
        "--xy_lora_files",
        type=str,
        nargs="+",
        default=None,
        help="X/Y grid: LoRA files (or a glob) of one LoRA, e.g. epoch files; x axis, or y axis with --xy_lora_weights",
    )
    add_logging_arguments(p)
    return p


@dataclass(frozen=True)
class GenSettings:
    """Everything gen_img.py was asked for, checked (``settings_from_args``)."""

    ckpt: str
    outdir: str = "outputs"
    prompt: str | None = None
    from_file: str | None = None
    sdxl: bool = False
    v2: bool | None = None
    v_parameterization: bool | None = None
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    images_per_prompt: int = 1
    n_iter: int = 1
    sequential_file_name: bool = False
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    steps: int = 50
    sampler: str = "ddim"
    scale: float = 7.5
    seed: int | None = None
    dtype: str = "float32"
    no_half_vae: bool = False
    xformers: bool = False
    device: str | None = None
    network_modules: tuple[str | None, ...] = ()
    network_weights: tuple[str, ...] = ()
    network_muls: tuple[float, ...] = ()
    network_args: tuple[str | None, ...] = ()
    network_merge: bool = False
    textual_inversion_embeddings: tuple[str, ...] = ()
    clip_skip: int | None = None
    max_token_length: int | None = None
    xy_lora_weights: tuple[float, ...] | None = None
    xy_lora_files: tuple[str, ...] | None = None


def refuse_unsupported(argv: Sequence[str]) -> None:
    """A one-line UserError naming every sd-scripts gen_img.py flag given that this tool does not implement."""
    given = sorted({a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in UNSUPPORTED_FLAGS})
    if given:
        raise UserError(
            f"gen_img.py: {', '.join(given)} not supported here (no highres fix, img2img, ControlNet, Deep Shrink, "
            "gradual latent, prompter modules, SDXL size conditioning flags); drop them"
        )


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UserError(f"{flag} {value}: must be 1 or more")
    return value


def _weights(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--xy_lora_weights {text!r}: write comma-separated numbers, e.g. 0,0.5,1") from None
    if not values:
        raise UserError("--xy_lora_weights: give at least one weight, e.g. 0,0.5,1")
    return values


def _network_lists(args: argparse.Namespace) -> tuple[tuple, tuple, tuple, tuple]:
    """(modules, weights files, multipliers, args) of every network: sd-scripts' lists, then each ``--lora``."""
    modules = list(args.network_module or [])
    files = list(args.network_weights or [])
    if modules and len(files) < len(modules):
        raise UserError(
            f"--network_weights: {len(modules)} --network_module given but {len(files)} weights files; "
            "give one file per module"
        )
    if files and not modules:
        raise UserError("--network_weights needs --network_module (one per file), or use --lora path:weight")
    files = files[: len(modules)]
    muls = [
        1.0 if args.network_mul is None or i >= len(args.network_mul) else float(args.network_mul[i])
        for i in range(len(files))
    ]
    net_args: list[str | None] = [
        args.network_args[i] if args.network_args and i < len(args.network_args) else None for i in range(len(files))
    ]
    chosen: list[str | None] = list(modules)
    for item in args.lora or []:
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                path, weight = item, 1.0  # a colon inside the path (Windows drive) and no weight
        chosen.append(None)
        files.append(path)
        muls.append(weight)
        net_args.append(None)
    return tuple(chosen), tuple(files), tuple(muls), tuple(net_args)


def settings_from_args(args: argparse.Namespace) -> GenSettings:
    """The checked settings of a parsed command line (one-line UserErrors for what cannot work)."""
    if not args.ckpt:
        raise UserError("--ckpt is required: a diffusers folder, a .safetensors/.ckpt file, a hub id or tiny-sd1")
    if args.prompt is None and args.from_file is None:
        raise UserError("give --prompt 'text' or --from_file prompts.txt")
    if args.prompt is not None and args.from_file is not None:
        raise UserError("--prompt and --from_file exclude each other; give one")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other; give one")
    if sum([args.v1, args.v2, args.sdxl]) > 1:
        raise UserError("--v1, --v2 and --sdxl exclude each other; give one (or none: the model says)")
    if args.max_embeddings_multiples is not None and args.max_embeddings_multiples not in (1, 2, 3):
        raise UserError(f"--max_embeddings_multiples {args.max_embeddings_multiples}: use 1, 2 or 3 (75 tokens each)")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: must be 1 or more")
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        _positive(getattr(args, flag), f"--{flag}")
    check_sampler_name(args.sampler, "--sampler")
    modules, files, muls, net_args = _network_lists(args)
    xy_weights = None if args.xy_lora_weights is None else _weights(args.xy_lora_weights)
    if xy_weights is not None and not files and args.xy_lora_files is None:
        raise UserError(
            "--xy_lora_weights varies the first network's weight: give one with --lora or --network_*, "
            "or give --xy_lora_files"
        )
    grid = xy_weights is not None or args.xy_lora_files is not None
    if grid and (args.images_per_prompt != 1 or args.n_iter != 1):
        raise UserError("--xy_lora_*: a grid has one image per cell; drop --images_per_prompt/--n_iter")
    multiples = args.max_embeddings_multiples
    return GenSettings(
        ckpt=args.ckpt,
        outdir=args.outdir,
        prompt=args.prompt,
        from_file=args.from_file,
        sdxl=args.sdxl,
        v2=True if args.v2 else (False if args.v1 else None),
        v_parameterization=True if args.v_parameterization else None,
        vae=args.vae,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        images_per_prompt=args.images_per_prompt,
        n_iter=args.n_iter,
        sequential_file_name=args.sequential_file_name,
        height=args.H,
        width=args.W,
        batch_size=args.batch_size,
        steps=args.steps,
        sampler=args.sampler,
        scale=args.scale,
        seed=args.seed,
        dtype="float16" if args.fp16 else ("bfloat16" if args.bf16 else "float32"),
        no_half_vae=args.no_half_vae,
        xformers=args.xformers,
        device=args.device,
        network_modules=modules,
        network_weights=files,
        network_muls=muls,
        network_args=net_args,
        network_merge=args.network_merge,
        textual_inversion_embeddings=tuple(args.textual_inversion_embeddings or ()),
        clip_skip=args.clip_skip,
        max_token_length=None if multiples in (None, 1) else 75 * multiples,
        xy_lora_weights=xy_weights,
        xy_lora_files=None if args.xy_lora_files is None else tuple(args.xy_lora_files),
    )
