"""Build the bundled tiny-shapes model (``tools/build_tiny_model.py``): data, VAE, configs, ``fine_tune.py`` from
scratch, packaging and a measured quality score. Deterministic from the seed; every stage is timed and logged."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.errors import UserError
from library.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from library.shapes import scenes as shapes
from library.shapes.vae_training import (
    VaeTrainSettings,
    load_images,
    reconstruction_error,
    refine_decoder,
    save_vae,
    train_vae,
)
from library.text.tokenizer import MAX_LENGTH, packaged_tokenizer_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BucketStage:
    """The second UNet + text-encoder stage: continue from a stage-1 checkpoint on aspect-ratio buckets at a larger
    area budget, with ``bucket_no_upscale`` (small images keep their size, large ones shrink to the budget), so the
    model also draws the non-square sizes. Stage 1 is square 64 px only: cheaper per step, where shapes, colours and
    words are learned."""

    resolution: int = 96
    steps: int = 2000
    learning_rate: float = 3e-4
    learning_rate_te: float = 1.5e-4
    warmup_steps: int = 50
    from_step: int | None = None
    """The stage-1 checkpoint it starts from (one of stage 1's ``--save_every_n_steps`` saves); None: the end."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything the build depends on (recorded in ``build.json``)."""

    output_dir: Path
    work_dir: Path
    seed: int = 0
    images: int = 4000
    vae: VaeTrainSettings = VaeTrainSettings()
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 2
    resolution: int = 64
    batch_size: int = 32
    train_steps: int = 8000
    learning_rate: float = 1e-3
    learning_rate_te: float = 5e-4
    warmup_steps: int = 100
    buckets: BucketStage = BucketStage()
    caption_dropout_rate: float = 0.1
    eval_seeds: int = 4
    eval_steps: int = 25
    eval_scale: float = 5.0
    eval_sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96))
    train_eval_count: int = 48
    overwrite: bool = False
    reuse_work_dir: bool = False
    """Keep what ``work_dir`` already holds (the VAE, stage-1 checkpoints, with their recorded timings) and run only
    the missing stages; the data is rendered again (it is deterministic and takes seconds)."""


def _timed(timings: dict[str, float], name: str, fn, *args):
    start = time.perf_counter()
    logger.info("stage %s: start", name)
    result = fn(*args)
    timings[name] = round(time.perf_counter() - start, 1)
    logger.info("stage %s: done in %.1f s", name, timings[name])
    return result


def _remember(work: Path, name: str, record: dict) -> None:
    """Store a finished stage's record (timings, results) in the work folder, for a later ``reuse_work_dir`` build.
    A ``note`` added to a record by hand (how a stage was really run, e.g. stopped and resumed) goes into
    ``build.json`` whenever the stage is reused."""
    atomic_write_json(work / "stages.json", {**_stages(work), name: record})


def _stages(work: Path) -> dict[str, dict]:
    """Every stage record ``_remember`` stored in ``work`` (empty for a new work folder)."""
    path = work / "stages.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def make_dataset(settings: BuildSettings, folder: Path) -> dict:
    """Render the training scenes (held-out triples excluded) with ``.txt`` captions and a fine-tuning metadata file."""
    held_out = shapes.held_out_combinations()
    scenes = shapes.random_scenes(settings.images, settings.seed, exclude=held_out)
    paths = shapes.write_dataset(folder / "images", scenes, settings.seed)
    metadata = {path.stem: {"caption": scene.caption} for path, scene in zip(paths, scenes, strict=True)}
    atomic_write_json(folder / "meta.json", metadata)
    return {
        "images": len(paths),
        "sizes": [list(s) for s in shapes.DEFAULT_SIZES],
        "held_out": [list(c) for c in held_out],
        "generator": "library.shapes.scenes.random_scenes + write_dataset",
        "seed": settings.seed,
        "paths": paths,
    }


def scratch_configs(settings: BuildSettings, vae_config: dict) -> dict[str, dict]:
    """The from-scratch architecture: SD 1.x layout (4 UNet blocks, 3 with cross-attention), a small CLIP text
    encoder with the real 49408-token vocabulary, the trained VAE's config and SD's noise schedule."""
    unet = dict(
        _class_name="UNet2DConditionModel",
        sample_size=12,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=list(settings.unet_channels),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=settings.text_width,
        attention_head_dim=settings.attention_head_dim,
    )
    text_encoder = dict(
        architectures=["CLIPTextModel"],
        model_type="clip_text_model",
        vocab_size=49408,
        hidden_size=settings.text_width,
        intermediate_size=4 * settings.text_width,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=settings.text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    scheduler = dict(
        _class_name="DDPMScheduler",
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return {"unet": unet, "text_encoder": text_encoder, "vae": vae_config, "scheduler": scheduler}


def write_scratch_folder(configs: dict[str, dict], folder: Path) -> None:
    """``unet/``, ``vae/``, ``text_encoder/`` config.json and ``scheduler/scheduler_config.json`` for
    ``fine_tune.py --from_scratch_config``."""
    with atomic_dir(folder) as tmp:
        for name, config in configs.items():
            (tmp / name).mkdir()
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            (tmp / name / file).write_text(json.dumps(config, indent=2), encoding="utf-8")


def dataset_toml(settings: BuildSettings, data: Path, resolution: int, no_upscale: bool = False) -> str:
    """The dataset config: one fine-tuning subset, aspect-ratio buckets 64-128 px at ``resolution``'s area budget,
    caption dropout for CFG."""
    return (
        "[general]\n"
        f"caption_dropout_rate = {settings.caption_dropout_rate}\n\n"
        "[[datasets]]\n"
        f"resolution = {resolution}\n"
        f"batch_size = {settings.batch_size}\n"
        "enable_bucket = true\n"
        "min_bucket_reso = 64\n"
        "max_bucket_reso = 128\n"
        "bucket_reso_steps = 16\n" + ("bucket_no_upscale = true\n" if no_upscale else "") + "\n  [[datasets.subsets]]\n"
        f"  image_dir = {json.dumps(str(data / 'images'))}\n"
        f"  metadata_file = {json.dumps(str(data / 'meta.json'))}\n"
    )


def _fine_tune(model: list[str], toml: Path, out: Path, rates: tuple[float, float, int], steps: int, seed: int):
    return [
        sys.executable,
        str(REPO_ROOT / "fine_tune.py"),
        *model,
        "--dataset_config", str(toml),
        "--train_text_encoder",
        "--cache_latents",
        "--optimizer_type", "AdamW",
        "--learning_rate", str(rates[0]),
        "--learning_rate_te", str(rates[1]),
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", str(rates[2]),
        "--min_snr_gamma", "5",
        "--max_train_steps", str(steps),
        "--save_every_n_steps", str(max(steps // 4, 1)),
        "--mixed_precision", "no",
        "--max_data_loader_n_workers", "0",
        "--seed", str(seed),
        "--output_dir", str(out),
        "--output_name", "tiny-shapes",
        "--save_model_as", "diffusers_safetensors",
    ]  # fmt: skip


def fine_tune_command(settings: BuildSettings, scratch: Path, vae: Path, toml: Path, out: Path) -> list[str]:
    """Stage 1, ``fine_tune.py``'s real command line: UNet + text encoder from scratch, square 64 px."""
    model = ["--from_scratch_config", str(scratch), "--vae", str(vae)]
    rates = (settings.learning_rate, settings.learning_rate_te, settings.warmup_steps)
    return _fine_tune(model, toml, out, rates, settings.train_steps, settings.seed)


def bucket_command(settings: BuildSettings, start: Path, toml: Path, out: Path) -> list[str]:
    """Stage 2, ``fine_tune.py``'s real command line: continue from the stage-1 checkpoint ``start`` on buckets."""
    stage = settings.buckets
    rates = (stage.learning_rate, stage.learning_rate_te, stage.warmup_steps)
    return _fine_tune(["--pretrained_model_name_or_path", str(start)], toml, out, rates, stage.steps, settings.seed)


def stage1_checkpoint(settings: BuildSettings, folder: Path) -> Path:
    """Where stage 1 leaves the model stage 2 starts from: its final save or a ``--save_every_n_steps`` one."""
    step = settings.buckets.from_step
    return folder / ("tiny-shapes" if step is None or step == settings.train_steps else f"tiny-shapes-step{step:08d}")


def _write_tokenizer(folder: Path) -> None:
    """The packaged CLIP tokenizer's files plus a config fixing ``model_max_length`` to 77."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(packaged_tokenizer_dir() / name, folder / name)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def package(trained: Path, output: Path) -> dict:
    """Copy the trained model into ``output`` in diffusers layout with float16 safetensors weights."""
    from library.models.load import load_model
    from library.models.save import save_model

    components = load_model(trained)
    staging = output.parent / f".{output.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_model(components, staging, "diffusers_safetensors", precision="fp16")
    shutil.rmtree(staging / "tokenizer")
    _write_tokenizer(staging / "tokenizer")
    for config in staging.glob("*/config.json"):  # the build's scratch paths mean nothing to whoever loads it
        values = json.loads(config.read_text(encoding="utf-8"))
        atomic_write_json(config, {k: v for k, v in values.items() if k != "_name_or_path"})
    with atomic_dir(output) as tmp:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
    shutil.rmtree(staging)
    sizes = {str(p.relative_to(output)): p.stat().st_size for p in sorted(output.rglob("*")) if p.is_file()}
    parameters = {
        "unet": sum(p.numel() for p in components.unet.parameters()),
        "vae": sum(p.numel() for p in components.vae.parameters()),
        "text_encoder": sum(p.numel() for p in components.text_encoders[0].parameters()),
    }
    return {"file_bytes": sizes, "total_bytes": sum(sizes.values()), "parameters": parameters}


def _generate(components, scenes: list, settings: BuildSettings, seed_base: int) -> list:
    from library.generate.images import ImageRequest, render
    from library.text.encode import TextEncodingSettings

    images = []
    text = TextEncodingSettings()
    batch = 16
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        requests = [
            ImageRequest(s.caption, "", s.width, s.height, settings.eval_steps, settings.eval_scale, "ddim", seed)
            for seed, s in enumerate(chunk, seed_base + start)
        ]
        images.extend(render(components, requests, text, torch.device("cpu")))
    return images


def evaluate_model(model: Path, settings: BuildSettings, grids: Path | None = None) -> dict:
    """Score generated images against their captions: every held-out triple × ``eval_seeds`` seeds at each
    evaluation size, and as many random training triples. ``grids``: also save each size's held-out images in this
    folder as ``held_out_<w>x<h>.png`` (a row per triple, a column per seed)."""
    from library.generate.grid import make_grid
    from library.models.load import load_model
    from library.shapes.evaluate import score

    components = load_model(model)
    held_out = shapes.held_out_combinations()
    results: dict = {"scale": settings.eval_scale, "steps": settings.eval_steps, "sampler": "ddim", "sizes": {}}
    for width, height in settings.eval_sizes:
        scenes = [shapes.Scene(c, s, b, width, height) for c, s, b in held_out for _ in range(settings.eval_seeds)]
        images = _generate(components, scenes, settings, 1000)
        results["sizes"][f"{width}x{height}"] = {"held_out": score(images, scenes), "count": len(scenes)}
        if grids is not None:
            seeds = settings.eval_seeds
            rows = [images[i : i + seeds] for i in range(0, len(images), seeds)]
            picture = make_grid(rows, [f"sample {i + 1}" for i in range(seeds)], [s.caption for s in scenes[::seeds]])
            grids.mkdir(parents=True, exist_ok=True)
            with atomic_path(grids / f"held_out_{width}x{height}.png", suffix=".png") as tmp:
                picture.save(tmp, format="PNG")
        train = shapes.random_scenes(
            settings.train_eval_count, settings.seed + 1, sizes=[(width, height)], exclude=held_out
        )
        images = _generate(components, train, settings, 5000)
        results["sizes"][f"{width}x{height}"]["train"] = score(images, train)
        logger.info("quality at %dx%d: %s", width, height, json.dumps(results["sizes"][f"{width}x{height}"]))
    return results


def reevaluate(settings: BuildSettings, grids: Path | None = None) -> dict:
    """Score an already built model again with ``settings``' evaluation options and update its ``build.json``."""
    record_path = settings.output_dir / "build.json"
    if not record_path.is_file():
        raise UserError(f"{settings.output_dir}: no build.json here; build the model first (without --evaluate_only)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    start = time.perf_counter()
    record["quality"] = evaluate_model(settings.output_dir, settings, grids)
    record["runtime_s"]["evaluate"] = round(time.perf_counter() - start, 1)
    atomic_write_json(record_path, record)
    return record


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _settings_record(settings: BuildSettings) -> dict:
    record = asdict(settings)
    for key in ("output_dir", "work_dir", "overwrite", "reuse_work_dir"):
        record.pop(key)
    return record


def _vae_stage(settings: BuildSettings, images: list, timings: dict, reused: list[str]) -> AutoencoderKL:
    """Train the VAE (joint loop, then decoder only) into ``work/vae``, or load the one a previous build left there."""
    from diffusers import AutoencoderKL

    work = settings.work_dir
    key = json.loads(json.dumps({"vae": asdict(settings.vae), "images": settings.images, "seed": settings.seed}))
    remembered = _stages(work).get("vae")
    if settings.reuse_work_dir and remembered and remembered["settings"] == key and (work / "vae").is_dir():
        logger.info("stage vae: reusing %s", work / "vae")
        reused.append("vae")
        timings.update(vae=remembered["seconds"], vae_decoder=remembered["decoder_seconds"])
        return AutoencoderKL.from_pretrained(work / "vae")
    result = _timed(timings, "vae", train_vae, images, settings.vae)
    vae = result["vae"]
    decoder = _timed(timings, "vae_decoder", refine_decoder, vae, images, settings.vae)
    save_vae(vae, work / "vae")
    _remember(
        work,
        "vae",
        {
            "settings": key,
            "seconds": timings["vae"],
            "final_loss": round(sum(result["losses"][-50:]) / len(result["losses"][-50:]), 5),
            "scaling_factor": result["scaling_factor"],
            "decoder_seconds": timings["vae_decoder"],
            "decoder_final_loss": round(sum(decoder["losses"][-50:]) / max(1, len(decoder["losses"][-50:])), 5),
        },
    )
    return vae


def _training_stage(
    stage: tuple[str, str], command: list[str], model: Path, settings: BuildSettings, timings: dict, reused: list
):
    """Run one ``fine_tune.py`` stage (its name, and the stage it continues) until it has written ``model``, or reuse
    the ``model`` a previous build left with the same arguments when the stage before was reused too."""
    (name, before), work, arguments = stage, settings.work_dir, command[2:]
    remembered = _stages(work).get(name)
    same = remembered is not None and remembered["arguments"] == arguments and before in reused
    if settings.reuse_work_dir and same and model.is_dir():
        logger.info("stage %s: reusing %s", name, model)
        reused.append(name)
        timings[name] = remembered["seconds"]
        return
    shutil.rmtree(model.parent, ignore_errors=True)
    logger.info("running: %s", shlex.join(command))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = _timed(timings, name, lambda: subprocess.run(command, cwd=REPO_ROOT, env=env, check=False))
    if done.returncode != 0:
        raise UserError(f"fine_tune.py failed (exit {done.returncode}); see its log above")
    if not model.is_dir():
        raise UserError(f"{model}: {name} did not save this model; check --bucket_from_step against its saves")
    _remember(work, name, {"arguments": arguments, "seconds": timings[name]})


def build(settings: BuildSettings, grids: Path | None = None) -> dict:
    """Run every stage; write the model and ``build.json`` to ``settings.output_dir`` (and the evaluation's
    pictures to ``grids``). Returns the record."""
    output, work = settings.output_dir, settings.work_dir
    if output.exists() and not settings.overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    if work.exists() and not settings.reuse_work_dir:
        if not settings.overwrite:
            raise UserError(f"--work_dir {work}: already exists; pass --overwrite or pick an empty folder")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    reused: list[str] = []
    data = _timed(timings, "dataset", make_dataset, settings, work / "data")
    images = load_images(data.pop("paths"))
    vae = _vae_stage(settings, images, timings, reused)
    vae_error = reconstruction_error(vae, images[:100])
    logger.info("vae: scaling factor %.5f, reconstruction error %.2f / 255", vae.config.scaling_factor, vae_error)
    vae_config = {k: v for k, v in vae.config.items() if k != "_name_or_path"}  # set when reused (loaded from disk)
    write_scratch_folder(scratch_configs(settings, vae_config), work / "scratch-config")
    atomic_write_text(work / "dataset.toml", dataset_toml(settings, work / "data", settings.resolution))
    command = fine_tune_command(settings, work / "scratch-config", work / "vae", work / "dataset.toml", work / "ft")
    checkpoint = stage1_checkpoint(settings, work / "ft")
    _training_stage(("fine_tune", "vae"), command, checkpoint, settings, timings, reused)
    trained, record_commands = checkpoint, {"fine_tune_command": shlex.join(["python", *command[1:]])}
    if settings.buckets.steps > 0:
        toml = work / "dataset-buckets.toml"
        atomic_write_text(toml, dataset_toml(settings, work / "data", settings.buckets.resolution, no_upscale=True))
        command = bucket_command(settings, checkpoint, toml, work / "ft-buckets")
        trained = work / "ft-buckets" / "tiny-shapes"
        _training_stage(("bucket_stage", "fine_tune"), command, trained, settings, timings, reused)
        record_commands["bucket_stage_command"] = shlex.join(["python", *command[1:]])
    packaged = _timed(timings, "package", package, trained, output)
    quality = _timed(timings, "evaluate", evaluate_model, output, settings, grids)
    timings["total"] = round(sum(timings.values()), 1)
    stages = _stages(work)
    vae_record = {k: v for k, v in stages.get("vae", {}).items() if k != "settings"}
    record = {
        "settings": _settings_record(settings),
        "data": data,
        "vae_training": {**vae_record, "reconstruction_error_255": round(vae_error, 2)},
        **record_commands,
        "trained_model": str(trained.relative_to(work)),
        "reused_stages": reused,
        "stage_notes": {name: stages[name]["note"] for name in reused if "note" in stages[name]},
        "git_commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "runtime_s": timings,
        "model": packaged,
        "weights_dtype": "float16 (safetensors); load in float32 for training",
        "quality": quality,
    }
    atomic_write_json(output / "build.json", record)
    logger.info("built %s: %.1f MB in %.0f s", output, packaged["total_bytes"] / 1e6, timings["total"])
    return record
