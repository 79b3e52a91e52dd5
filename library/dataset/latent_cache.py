"""Latent caching (``--cache_latents`` in memory, ``--cache_latents_to_disk`` as sd-scripts' npz files).

File format (sd-scripts compatible): ``<stem>_<WWWW>x<HHHH>_sd.npz`` beside the image (original image size in the
name; SDXL's end ``_sdxl.npz``: the caller passes the suffix as ``CacheJob.suffix``) with ``latents`` (4, h, w)
float32 unscaled (``vae.encode(x).latent_dist.sample()``), ``original_size``, ``crop_ltrb``, optional
``latents_flipped`` and ``alpha_mask`` (H, W; the product of the alpha, ``-masklabel`` and
conditioning masks). We add ``cache_key``: a JSON string naming
everything the latents depend on (image size + mtime, bucket, crop, flip, mask, interpolation, VAE weights), and
``content_hash``: a CRC-32 of the bytes of the image and its mask/conditioning files, so an image edited in
place with its size and mtime restored is noticed too. An entry is reused only when both match; a stale entry
(including one of ours written before ``content_hash`` existed) is recomputed, an unreadable one recomputed with a
warning. A folder where a cache file should be is a one-line error.

Prepared latents (``finetune/prepare_buckets_latents.py``'s ``<image_key>.npz``, ``CacheJob.npz_path``) are the same
encoding written under another name, so they are bit-identical to this cache's for the same image, bucket and VAE.
Training reads them as they are (``prepared_problem``) when the metadata gives the image's ``train_resolution``.
Ours are checked like this cache's files (VAE, interpolation, image size, mtime and content hash). sd-scripts' own,
which carry no ``cache_key``/``content_hash``, are used unless the image is newer than the npz; then the image is
encoded instead, with a warning. When the image is gone, the npz is used alone, as sd-scripts allowed.

Sampling noise comes from a generator seeded from each image's file name and geometry (``noise_seed``), so latents
do not depend on the batch an image was encoded in, its folder or its file times: re-caching an unchanged image, a
copy of it or a fresh clone of the dataset gives identical latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.images import ImageLoadError, PreparedImage, prepare_image
from library.dataset.types import PIXEL_AUGMENT_KEYS, DatasetConfig, SubsetConfig
from library.errors import UserError
from library.io import atomic_path

logger = logging.getLogger("sdtrain.dataset")

NPZ_SUFFIX = "_sd.npz"  # sd-scripts' SdSdxlLatentsCachingStrategy: "_sd.npz" for SD 1.x/2.x, "_sdxl.npz" for SDXL
_LOADER_THREADS = 2
KEY_VERSION = 1
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class CacheJob:
    """One image to encode, with every setting its latents depend on."""

    path: Path
    bucket: tuple[int, int]
    resized: tuple[int, int]
    original_size: tuple[int, int]
    flip_aug: bool = False
    alpha_mask: bool = False
    mask_path: Path | None = None
    interpolation: str | None = None
    conditioning_path: Path | None = None  # --masked_loss mask image from conditioning_data_dir
    suffix: str = NPZ_SUFFIX  # the model family's cache file suffix (sd-scripts: "_sd.npz", SDXL "_sdxl.npz")
    npz_path: Path | None = None  # where the file goes instead (prepare_buckets_latents.py's "<image_key>.npz")

    def target(self) -> Path:
        """The cache file of this job: ``npz_path`` when set, else sd-scripts' training cache name."""
        return self.npz_path or npz_path_for(self.path, self.original_size, self.suffix)


@dataclass(frozen=True)
class LatentEntry:
    """Cached latents of one image; ``alpha_mask`` is (H, W) at pixel resolution, not flipped."""

    latents: torch.Tensor
    latents_flipped: torch.Tensor | None
    alpha_mask: torch.Tensor | None
    original_size: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]


@dataclass
class CacheReport:
    """Outcome of caching: ``entries[i]`` is job i's LatentEntry (memory) or npz path (disk)."""

    entries: dict[int, LatentEntry | Path] = field(default_factory=dict)
    failed: list[ImageLoadError] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    stale: int = 0
    unreadable: int = 0


def npz_path_for(image_path: Path, original_size: tuple[int, int], suffix: str = NPZ_SUFFIX) -> Path:
    """sd-scripts' cache file name: ``<stem>_<WWWW>x<HHHH><suffix>`` next to the image (suffix ``_sd.npz`` for
    SD 1.x/2.x, ``_sdxl.npz`` for SDXL)."""
    return image_path.with_name(f"{image_path.stem}_{original_size[0]:04d}x{original_size[1]:04d}{suffix}")


def frozen_by_cache(subset: SubsetConfig) -> str | None:
    """The first rotation/colour-jitter key ``subset`` turns on (they change pixels the cache would encode once,
    without them), or None."""
    return next((key for key in PIXEL_AUGMENT_KEYS if getattr(subset, key)), None)


def refuse_incompatible(datasets: Sequence[DatasetConfig], flag: str = "--cache_latents") -> None:
    """Caching freezes one draw of any random augmentation; refuse the settings that would be silently lost."""
    for dataset in datasets:
        for subset in dataset.subsets:
            frozen = frozen_by_cache(subset)
            if frozen:
                raise UserError(
                    f"{subset.name}: {frozen} cannot be combined with {flag} (rotation and colour jitter change the "
                    f"pixels for every sample, and cached latents would keep none of it); set {frozen} = 0 or turn "
                    "off latent caching"
                )
            for key in ("color_aug", "random_crop"):
                if getattr(subset, key):
                    raise UserError(
                        f"{subset.name}: {key} cannot be combined with {flag} (a cached latent keeps one random "
                        f"augmentation for the whole run); turn off {key} or latent caching"
                    )
            if subset.face_crop_aug_range is not None and not dataset.enable_bucket:
                raise UserError(
                    f"{subset.name}: face_crop_aug_range cannot be combined with {flag} (the random face crop would "
                    "be frozen in the cache); turn off face_crop_aug_range or latent caching"
                )


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the encoder weights (the decoder does not affect latents): identifies the VAE in cache keys.

    Parameter names are left out, so a module wrapping the same VAE has the same identity."""
    digest = hashlib.sha256()
    for name, tensor in vae.state_dict().items():
        if "decoder" in name or "post_quant_conv" in name:
            continue
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def job_key(job: CacheJob, vae_id: str) -> str:
    """The cache key: changes whenever anything that affects the cached arrays changes."""

    def stat(path: Path | None) -> list[int] | None:
        if path is None:
            return None
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    conditioning = {"cond": [str(job.conditioning_path), *stat(job.conditioning_path)]} if job.conditioning_path else {}
    return json.dumps(
        {
            **conditioning,
            "v": KEY_VERSION,
            "image": [job.path.name, *stat(job.path)],
            "size": list(job.original_size),
            "bucket": list(job.bucket),
            "resized": list(job.resized),
            "crop": "center",
            "flip": job.flip_aug,
            "alpha": job.alpha_mask,
            "mask": stat(job.mask_path),
            "interp": job.interpolation,
            "vae": vae_id,
        },
        separators=(",", ":"),
    )


def content_hash(job: CacheJob) -> str:
    """CRC-32 and length of every byte of the image, mask and conditioning files of ``job``, e.g.
    ``crc32:1a2b3c4d/20480,-,-`` (raises OSError if a file cannot be read).

    It catches an image edited in place with its size and mtime restored (the stat part of the key catches the
    rest). CRC-32 (zlib) was chosen by measurement: 2-4x cheaper than BLAKE2b or SHA-256 on these machines
    (benchmarks/cache_check_bench.py), and a 2**-32 chance of missing an accidental edit is enough here.
    """
    parts = []
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    for path in (job.path, job.mask_path, job.conditioning_path):
        if path is None:
            parts.append("-")
            continue
        crc = size = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                crc = zlib.crc32(view[:n], crc)
                size += n
        parts.append(f"{crc:08x}/{size}")
    return "crc32:" + ",".join(parts)


def noise_seed(job: CacheJob) -> int:
    """The seed of an image's latent sampling noise: from its file name and geometry only, not its folder or file
    times, so a copied or freshly cloned dataset caches exactly the same latents (a run is then reproducible)."""
    text = json.dumps([job.path.name, list(job.original_size), list(job.bucket), list(job.resized)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def read_npz(path: Path) -> tuple[LatentEntry, str | None]:
    """Read a cache file (ours or sd-scripts'); raises on a missing, truncated or malformed file."""
    return _read_npz(path)[:2]


def _read_npz(path: Path) -> tuple[LatentEntry, str | None, str | None]:
    """The entry, ``cache_key`` and ``content_hash`` of a cache file (None for fields the file lacks)."""
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        latents = torch.from_numpy(z["latents"].astype(np.float32))
        flipped = torch.from_numpy(z["latents_flipped"].astype(np.float32)) if "latents_flipped" in files else None
        mask = torch.from_numpy(z["alpha_mask"].astype(np.float32)) if "alpha_mask" in files else None
        original = tuple(int(x) for x in z["original_size"].tolist())
        crop = tuple(int(x) for x in z["crop_ltrb"].tolist())
        key = str(z["cache_key"]) if "cache_key" in files else None
        digest = str(z["content_hash"]) if "content_hash" in files else None
    return LatentEntry(latents, flipped, mask, original, crop), key, digest


def prepared_problem(npz: Path, job: CacheJob, vae_id: str | None) -> str | None:
    """Why prepare_buckets_latents.py's ``npz`` cannot stand in for encoding ``job`` (the run's view of the image:
    bucket = train_resolution, flip_aug, alpha_mask, masks, interpolation); None when it can.

    The file must fit the run (latent size, flipped latents with flip_aug, an alpha mask exactly when alpha_mask,
    no -masklabel/conditioning masks, which prepared files cannot hold). Then, for a file of ours (``cache_key``),
    the rules of the training cache: same VAE (``vae_id``; None: not checked) and interpolation, and the image
    unchanged (size, mtime and ``content_hash``). For sd-scripts' own files, which carry no such fields: stale when
    the image is newer than the npz. An image that is gone is not checked: the npz is used alone, as sd-scripts
    allowed.
    """
    try:
        entry, stored, digest = _read_npz(npz)
    except Exception as e:  # a truncated or foreign file fails in many ways
        return f"unreadable ({type(e).__name__})"
    latent_hw = (job.bucket[1] // 8, job.bucket[0] // 8)
    if tuple(entry.latents.shape[1:]) != latent_hw:
        h, w = entry.latents.shape[1:]
        return f"latents are for {w * 8}x{h * 8}, not the train_resolution {job.bucket[0]}x{job.bucket[1]}"
    if job.flip_aug and (entry.latents_flipped is None or entry.latents_flipped.shape != entry.latents.shape):
        return "no flipped latents (the subset has flip_aug; prepare with --flip_aug)"
    if (entry.alpha_mask is not None) != job.alpha_mask:
        return "alpha mask " + ("missing (prepare with --alpha_mask)" if job.alpha_mask else "present, alpha_mask off")
    if job.mask_path is not None or job.conditioning_path is not None:
        return "--masked_loss masks (-masklabel.png, conditioning_data_dir) are not part of prepared latents"
    if stored is not None:
        try:
            made = json.loads(stored)
            made_job = dataclasses.replace(
                job,
                bucket=tuple(made["bucket"]),
                resized=tuple(made["resized"]),
                original_size=tuple(made["size"]),
                flip_aug=bool(made["flip"]),
                alpha_mask=bool(made["alpha"]),
                interpolation=made["interp"],
            )
        except (ValueError, KeyError, TypeError):
            return "its cache_key is malformed"
        if vae_id is not None and made.get("vae") != vae_id:
            return "made with another VAE"
        if made_job.interpolation != job.interpolation:
            return f"made with resize interpolation {made_job.interpolation}, not {job.interpolation}"
    if not job.path.exists():
        return None
    try:
        if stored is None:
            return "the image is newer than it" if job.path.stat().st_mtime > npz.stat().st_mtime else None
        if job_key(made_job, made["vae"]) != stored or digest != content_hash(made_job):
            return "the image changed since it was prepared"
    except OSError as e:
        return f"the image cannot be read ({e.strerror or type(e).__name__})"
    return None


def load_entry(entry: LatentEntry | Path) -> LatentEntry:
    """The LatentEntry behind a cache reference (reads the npz for disk caches)."""
    if isinstance(entry, LatentEntry):
        return entry
    try:
        return read_npz(entry)[0]
    except Exception as e:
        raise UserError(
            f"{entry}: latent cache file unreadable ({type(e).__name__}); delete it and run again without "
            "--skip_cache_check so it is rebuilt"
        ) from e


def _usable(path: Path, job: CacheJob, key: str, report: CacheReport) -> bool:
    """True when ``path`` holds valid latents for ``key``; counts stale/unreadable files in ``report``."""
    try:
        entry, stored, digest = _read_npz(path)
    except Exception as e:
        logger.warning("%s: latent cache file unreadable (%s: %s); recomputing it", path, type(e).__name__, e)
        report.unreadable += 1
        return False
    latent_hw = (job.bucket[1] // 8, job.bucket[0] // 8)
    ok = (
        stored == key
        and tuple(entry.latents.shape[1:]) == latent_hw
        and (entry.latents_flipped is not None) == job.flip_aug
        and (entry.alpha_mask is not None)
        == (job.alpha_mask or job.mask_path is not None or job.conditioning_path is not None)
        and digest is not None
    )
    if ok:
        try:
            ok = digest == content_hash(job)
        except OSError:
            ok = False  # the image cannot be read now; the loader reports it
    if not ok:
        report.stale += 1
    return ok


def cache_latents(
    jobs: Sequence[CacheJob],
    vae: torch.nn.Module,
    *,
    to_disk: bool,
    batch_size: int = 1,
    skip_check: bool = False,
    progress: bool = True,
    vae_id: str | None = None,
    recompute: bool = False,
    loader_threads: int = _LOADER_THREADS,
) -> CacheReport:
    """Encode every job's image (batched per bucket, ``batch_size`` at a time) unless a valid cache exists.

    ``to_disk``: write/reuse npz files and return their paths; otherwise return in-memory entries.
    ``skip_check``: trust any existing npz without reading it (sd-scripts' ``--skip_cache_check``).
    ``recompute``: encode and rewrite every file even where a valid one exists. ``loader_threads`` decode images
    while the VAE works.
    Images that cannot be decoded are reported in ``failed`` (with a warning) and get no entry.
    """
    if batch_size < 1:
        raise UserError(f"--vae_batch_size must be at least 1, got {batch_size}")
    report = CacheReport()
    if vae_id is None:
        vae_id = vae_fingerprint(vae)
    todo: list[tuple[int, str]] = []
    if to_disk:
        _refuse_folders(jobs)
    for i, job in enumerate(jobs):
        key = job_key(job, vae_id)
        path = job.target()
        if to_disk and not recompute and path.exists() and (skip_check or _usable(path, job, key, report)):
            report.entries[i] = path
            report.reused += 1
        else:
            todo.append((i, key))
    if report.stale:
        logger.info("%d latent cache file(s) are stale (image, settings or VAE changed); recomputing", report.stale)
    todo.sort(key=lambda item: (jobs[item[0]].bucket, jobs[item[0]].flip_aug, item[0]))
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for item in todo:
        groups.setdefault((jobs[item[0]].bucket, jobs[item[0]].flip_aug), []).append(item)
    chunks = [
        [(i, key, jobs[i]) for i, key in items[start : start + batch_size]]
        for items in groups.values()
        for start in range(0, len(items), batch_size)
    ]
    # decode the next chunk's images in threads while the VAE encodes the current one (Pillow and torch both
    # release the GIL), so the VAE never waits for image decoding
    with (
        tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress or not todo) as bar,
        ThreadPoolExecutor(max(1, loader_threads)) as pool,
    ):
        pending = [pool.submit(_load, job, to_disk) for _, _, job in chunks[0]] if chunks else []
        for n, chunk in enumerate(chunks):
            results = [f.result() for f in pending]
            pending = [pool.submit(_load, job, to_disk) for _, _, job in chunks[n + 1]] if n + 1 < len(chunks) else []
            loaded = []
            for (i, key, job), result in zip(chunk, results):
                if isinstance(result, ImageLoadError):
                    logger.warning("%s; skipping it", result)
                    report.failed.append(result)
                else:
                    loaded.append((i, key, job, result))
            if loaded:
                _encode_chunk(loaded, vae, to_disk, report)
            bar.update(len(chunk))
    return report


def _refuse_folders(jobs: Sequence[CacheJob]) -> None:
    """A folder where a cache file belongs would fail every write; name it before any encoding starts."""
    for job in jobs:
        path = job.target()
        if path.is_dir():
            raise UserError(
                f"{path}: a folder is where this latent cache file should be written; remove or rename it and rerun"
            )


def _load(job: CacheJob, hashed: bool) -> tuple[PreparedImage, str | None] | ImageLoadError:
    """The centre-cropped, unflipped training image of ``job`` and, if ``hashed``, the content hash of its files
    taken before they are read (an edit in between makes the entry stale, never wrongly valid); or the error that
    prevented reading it."""
    try:
        digest = content_hash(job) if hashed else None
    except OSError as e:
        return ImageLoadError(e.filename or job.path, e.strerror or type(e).__name__)
    try:
        prepared = prepare_image(
            job.path,
            job.bucket,
            job.resized,
            random.Random(0),
            alpha_mask=job.alpha_mask,
            mask_path=job.mask_path,
            interpolation=job.interpolation,
            conditioning_path=job.conditioning_path,
        )
    except ImageLoadError as e:
        return e
    return prepared, digest


def _encode_chunk(
    loaded: list[tuple[int, str, CacheJob, tuple[PreparedImage, str | None]]],
    vae: torch.nn.Module,
    to_disk: bool,
    report: CacheReport,
) -> None:
    pixels = torch.stack([p.image for *_, (p, _) in loaded])
    seeds = [noise_seed(job) for _, _, job, _ in loaded]
    latents = _encode(vae, pixels, seeds)
    flipped = _encode(vae, pixels.flip(3), [s ^ 1 for s in seeds]) if loaded[0][2].flip_aug else None
    for n, (i, key, job, (prepared, digest)) in enumerate(loaded):
        mask = prepared.mask[0] if prepared.mask is not None else None
        entry = LatentEntry(
            latents[n].clone(),
            flipped[n].clone() if flipped is not None else None,
            mask,
            prepared.original_size,
            prepared.crop_ltrb,
        )
        if to_disk:
            path = job.target()
            _write_npz(path, entry, key, digest)
            report.entries[i] = path
        else:
            report.entries[i] = entry
        report.encoded += 1


def _encode(vae: torch.nn.Module, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """``latent_dist.sample()`` with one seeded generator per image: mean + std * noise, float32 on the CPU."""
    param = next(vae.parameters())
    with torch.inference_mode():
        dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    noise = torch.stack(
        [
            torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            for seed in seeds
        ]
    )
    return mean + std * noise


def _write_npz(path: Path, entry: LatentEntry, key: str, digest: str | None) -> None:
    """Write one cache file atomically; a full disk or other OS error is a one-line UserError naming ``path``."""
    arrays = {
        "latents": entry.latents.numpy(),
        "original_size": np.array(entry.original_size),
        "crop_ltrb": np.array(entry.crop_ltrb),
        "cache_key": np.array(key),
    }
    if digest is not None:
        arrays["content_hash"] = np.array(digest)
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = entry.latents_flipped.numpy()
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = entry.alpha_mask.numpy()
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def cache_latents_shared(
    jobs: Sequence[CacheJob],
    vae: torch.nn.Module,
    *,
    to_disk: bool,
    process_index: int,
    num_processes: int,
    barrier: Callable[[], None] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
    batch_size: int = 1,
    skip_check: bool = False,
    progress: bool = True,
) -> CacheReport:
    """``cache_latents`` split across the processes of a data-parallel run; every process gets the full report.

    Process ``k`` encodes jobs ``k, k + n, k + 2n, …``. On disk, each writes its share, waits at ``barrier``, then
    reads everything (a file another process could not write, e.g. on a disk that is not shared, is encoded
    here). In memory, the shares are exchanged with ``gather`` (each process's object -> the list over all
    processes, like ``torch.distributed.all_gather_object``); without ``gather`` every process encodes all jobs.
    Latents do not depend on which process or batch encoded an image, so the result equals a one-process run.
    ``encoded`` counts the images this process encoded.
    """
    if num_processes <= 1 or (not to_disk and gather is None):
        return cache_latents(
            jobs, vae, to_disk=to_disk, batch_size=batch_size, skip_check=skip_check, progress=progress
        )
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    if to_disk and barrier is None:
        raise ValueError("caching latents to disk from several processes needs a barrier")
    vae_id = vae_fingerprint(vae)
    mine = list(range(process_index, len(jobs), num_processes))
    show = progress and process_index == 0
    own = cache_latents(
        [jobs[i] for i in mine],
        vae,
        to_disk=to_disk,
        batch_size=batch_size,
        skip_check=skip_check,
        progress=show,
        vae_id=vae_id,
    )
    if to_disk:
        barrier()
        report = cache_latents(
            jobs, vae, to_disk=True, batch_size=batch_size, skip_check=skip_check, progress=show, vae_id=vae_id
        )
        report.encoded += own.encoded
        report.reused -= own.encoded
        return report
    report = CacheReport(encoded=own.encoded)
    for indices, entries, failed in gather((mine, own.entries, [(e.path, e.reason) for e in own.failed])):
        report.entries.update({indices[local]: entry for local, entry in entries.items()})
        report.failed.extend(ImageLoadError(path, reason) for path, reason in failed)
    report.failed.sort(key=lambda e: str(e.path))
    return report
