"""Pre-bucketed latents for fine-tuning (sd-scripts' ``finetune/prepare_buckets_latents.py``): every image is given
an aspect-ratio bucket, encoded by the VAE and saved as ``<image_key>.npz``; the metadata JSON gets each image's
``train_resolution`` (its bucket), so ``fine_tune.py --in_json`` trains from the npz files without a VAE.

The npz files hold sd-scripts' arrays (``latents`` (4, h, w) float32 unscaled, ``original_size``, ``crop_ltrb``,
``latents_flipped`` with --flip_aug, ``alpha_mask`` (H, W) with --alpha_mask) plus the training cache's
``cache_key`` and ``content_hash`` (library/dataset/latent_cache.py), so a changed image is noticed. Encoding is the
training cache's own: the latents are bit-identical to what ``--cache_latents_to_disk`` stores for the same image,
bucket and VAE. With --skip_existing a file that is still valid for its image is kept, which is how a re-run
resumes; without it every image is encoded again (sd-scripts' default), giving the same latents for unchanged images.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.dataset.buckets import BucketSettings, make_bucket_resolutions, select_bucket, validate_settings
from library.dataset.latent_cache import CacheJob, cache_latents, vae_fingerprint
from library.dataset.scan import read_size
from library.errors import UserError
from library.models.load import load_model, load_vae
from library.models.tiny import tiny_presets
from library.prep.common import PrepReport, find_images, pick_device
from library.prep.metadata import image_key, read_metadata_json, write_metadata

logger = logging.getLogger("sdtrain.prep")

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SIZE_THREADS = 8


@dataclass(frozen=True)
class LatentsJob:
    """One run of prepare_buckets_latents.py: sd-scripts' positional arguments and flags, plus --device/--debug."""

    train_data_dir: str
    in_json: str
    out_json: str
    model_name_or_path: str
    v2: bool = False  # accepted and unused, as in sd-scripts
    batch_size: int = 1
    max_data_loader_n_workers: int | None = None
    max_resolution: str = "512,512"
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    mixed_precision: str = "no"
    full_path: bool = False
    flip_aug: bool = False
    alpha_mask: bool = False
    skip_existing: bool = False
    recursive: bool = False
    device: str | None = None
    debug: bool = False


def npz_filename(data_dir: str, key: str, full_path: bool, recursive: bool) -> Path:
    """Where sd-scripts' script writes an image's latents: ``data_dir/<key>.npz``; with --full_path the key's file
    stem, in its sub-folder under ``data_dir`` when --recursive too."""
    if full_path:
        base = os.path.splitext(os.path.basename(key))[0]
        relative = os.path.relpath(os.path.dirname(key), data_dir)
    else:
        base, relative = key, ""
    if recursive and relative:
        return Path(data_dir, relative, base + ".npz")
    return Path(data_dir, base + ".npz")


def bucket_settings(job: LatentsJob) -> BucketSettings:
    """The flags' buckets (``--max_resolution`` "W,H" or "W" is the area budget), checked as training checks them."""
    try:
        sides = [int(v) for v in job.max_resolution.split(",")]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) <= 0:
        raise UserError(f"--max_resolution {job.max_resolution}: expected 'width,height' such as 512,512")
    settings = BucketSettings(
        resolution=(sides[0], sides[1]),
        enable_bucket=True,
        min_reso=job.min_bucket_reso,
        max_reso=job.max_bucket_reso,
        step=job.bucket_reso_steps,
        no_upscale=job.bucket_no_upscale,
    )
    if job.bucket_no_upscale:
        logger.info("--bucket_no_upscale: each image gets its own bucket from its size (as sd-scripts)")
    validate_settings(settings, "flags")
    if job.bucket_reso_steps % 32:
        logger.warning("--bucket_reso_steps %d is not a multiple of 32; SDXL needs one", job.bucket_reso_steps)
    return settings


def load_encoder(name: str) -> AutoencoderKL:
    """The VAE of ``model_name_or_path``: a diffusers folder (or its vae/), a single checkpoint or VAE file, a Hub id
    in the local cache, or a built-in tiny model (``tiny-sd1``)."""
    if name in tiny_presets() and not Path(name).exists():
        return load_model(name).vae
    return load_vae(name)


def _sizes(paths: list[Path], workers: int) -> list[tuple[int, int] | str]:
    def size(path: Path) -> tuple[int, int] | str:
        try:
            return read_size(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return f"cannot read image: {e}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(size, paths))


def prepare_latents(job: LatentsJob) -> PrepReport:
    """Bucket and encode every image of ``train_data_dir``, write the npz files and ``out_json`` (atomically, so
    ``in_json`` == ``out_json`` is safe); unreadable images are reported and left out."""
    if job.batch_size < 1:
        raise UserError(f"--batch_size {job.batch_size}: must be 1 or more")
    settings = bucket_settings(job)
    images = find_images(job.train_data_dir, job.recursive)
    metadata = read_metadata_json(Path(job.in_json), "in_json")
    logger.info("found %d images; %d entries in %s", len(images), len(metadata), job.in_json)
    device = pick_device(job.device)
    dtype = PRECISIONS[job.mixed_precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU (the CPU has no float16 convolutions); use bf16 or no")
    vae = load_encoder(job.model_name_or_path)
    vae_id = vae_fingerprint(vae)  # of the weights as stored: the training cache names the same VAE the same way
    vae.to(device).eval()
    if dtype != torch.float32:
        vae.to(dtype=dtype)

    report = PrepReport("prepare latents")
    workers = job.max_data_loader_n_workers if job.max_data_loader_n_workers is not None else 2
    table = None if settings.no_upscale else make_bucket_resolutions(settings)
    jobs: list[CacheJob] = []
    keys: list[str] = []
    owner: dict[str, Path] = {}
    for path, size in zip(images, _sizes(images, _SIZE_THREADS)):
        key = image_key(path, job.full_path)
        if isinstance(size, str):
            report.fail(path, size)
            continue
        if key in owner:
            report.fail(path, f"same image key '{key}' as {owner[key]}; use --full_path")
            continue
        owner[key] = path
        a = select_bucket(size, settings, table)
        target = npz_filename(job.train_data_dir, key, job.full_path, job.recursive)
        jobs.append(CacheJob(path, a.bucket, a.resized, size, job.flip_aug, job.alpha_mask, npz_path=target))
        keys.append(key)
    cached = cache_latents(
        jobs,
        vae,
        to_disk=True,
        batch_size=job.batch_size,
        vae_id=vae_id,
        recompute=not job.skip_existing,
        loader_threads=workers,
    )
    report.failed.extend(str(e.path) for e in cached.failed)
    report.processed, report.written, report.skipped = cached.encoded, cached.encoded, cached.reused
    buckets: dict[tuple[int, int], int] = {}
    for i in sorted(cached.entries):
        bucket = jobs[i].bucket
        metadata.setdefault(keys[i], {})["train_resolution"] = [bucket[0] - bucket[0] % 8, bucket[1] - bucket[1] % 8]
        buckets[bucket] = buckets.get(bucket, 0) + 1
        if job.debug:
            logger.info("%s: bucket %dx%d -> %s", keys[i], *bucket, jobs[i].target())
    for n, (bucket, count) in enumerate(sorted(buckets.items())):
        logger.info("bucket %d %dx%d: %d", n, *bucket, count)
    if buckets:
        errors = [abs(j.bucket[0] / j.bucket[1] - j.original_size[0] / j.original_size[1]) for j in jobs]
        logger.info("mean aspect ratio error: %.4f", sum(errors) / len(errors))
    write_metadata(Path(job.out_json), metadata)
    report.log(outputs=f"{len(cached.entries)} npz files under {job.train_data_dir}; metadata {job.out_json}")
    return report
