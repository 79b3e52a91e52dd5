"""Cost of the latent cache's content check: the settings key alone vs the key plus a hash of the image bytes.

    python benchmarks/cache_check_bench.py [--images 10000] [--npz 1000] [--json out.json]

Writes ``--images`` JPEG and PNG files of realistic small size (half 768x512 JPEG at quality 90, half 512x512 PNG;
smooth content with sensor-like noise) to a temporary folder, then times, per image:
  * ``key``: ``job_key`` (two stats and a JSON dump), the stat-based check the cache had before;
  * ``key+crc32``: ``job_key`` + ``content_hash`` (zlib CRC-32 of every byte, what the cache now stores);
  * ``key+blake2b``, ``key+sha256`` and ``key+sampled``: alternatives (BLAKE2b or SHA-256 of every byte; BLAKE2b of
    three 64 KiB blocks and the size) for comparison;
  * ``npz read``: reading one 512x512 image's cache file (4x64x64 float32), which every check already does;
and the key and hash again after evicting the images from the page cache (``posix_fadvise(DONTNEED)``; a VM's
host may still cache them). Reports ms per image and the total for all images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.dataset.latent_cache import CacheJob, content_hash, job_key, read_npz  # noqa: E402

VAE_ID = "0" * 32
BLOCK = 64 << 10


def make_images(folder: Path, count: int, distinct: int = 32) -> list[Path]:
    """``count`` files cycling through ``distinct`` encoded images (content does not matter, sizes do)."""
    rng = np.random.default_rng(0)
    encoded = []
    for n in range(distinct):
        jpeg = n % 2 == 0
        w, h = (768, 512) if jpeg else (512, 512)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) * rng.uniform(0.5, 1.0, 3)
        pixels = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"base{n}.{'jpg' if jpeg else 'png'}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if jpeg else {}))
        encoded.append((path.suffix, path.read_bytes()))
        path.unlink()
    paths = []
    for n in range(count):
        suffix, data = encoded[n % distinct]
        path = folder / f"img{n:05d}{suffix}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def digest_of(job: CacheJob, name: str) -> str:
    digest = hashlib.new(name)
    with open(job.path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sampled_of(job: CacheJob) -> str:
    digest = hashlib.blake2b(digest_size=16)
    size = job.path.stat().st_size
    with open(job.path, "rb", buffering=0) as f:
        for offset in sorted({0, max(0, size // 2 - BLOCK // 2), max(0, size - BLOCK)}):
            f.seek(offset)
            digest.update(f.read(BLOCK))
    digest.update(str(size).encode())
    return digest.hexdigest()


def timed(jobs: list[CacheJob], check: Callable[[CacheJob], object]) -> float:
    """Seconds to run ``check`` on every job."""
    start = time.perf_counter()
    for job in jobs:
        check(job)
    return time.perf_counter() - start


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--npz", type=int, default=1000, help="cache files to time reading (for comparison)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths = make_images(folder, args.images)
        sizes = [p.stat().st_size for p in paths]
        print(
            f"{len(paths)} images written in {time.perf_counter() - start:.1f} s; mean {np.mean(sizes) / 1024:.0f} KiB "
            f"(JPEG {np.mean(sizes[0::2]) / 1024:.0f} KiB, PNG {np.mean(sizes[1::2]) / 1024:.0f} KiB), "
            f"{sum(sizes) / 2**20:.0f} MiB in all"
        )
        jobs = [CacheJob(p, (512, 512), (512, 512), (512, 512)) for p in paths]
        checks: dict[str, Callable[[CacheJob], object]] = {
            "key": lambda job: job_key(job, VAE_ID),
            "key+crc32": lambda job: (job_key(job, VAE_ID), content_hash(job)),
            "key+blake2b": lambda job: (job_key(job, VAE_ID), digest_of(job, "blake2b")),
            "key+sha256": lambda job: (job_key(job, VAE_ID), digest_of(job, "sha256")),
            "key+sampled": lambda job: (job_key(job, VAE_ID), sampled_of(job)),
        }
        timed(jobs, checks["key+crc32"])  # warm the page cache and the code paths
        results = {name: timed(jobs, check) for name, check in checks.items()}
        latents = np.random.default_rng(0).standard_normal((4, 64, 64)).astype(np.float32)
        npz_paths = []
        for n in range(min(args.npz, len(paths))):
            npz = folder / f"img{n:05d}_0512x0512_sd.npz"
            np.savez(npz, latents=latents, original_size=np.array([512, 512]), crop_ltrb=np.array([0, 0, 512, 512]))
            npz_paths.append(npz)
        if npz_paths:
            start = time.perf_counter()
            for npz in npz_paths:
                read_npz(npz)
            results["npz read"] = (time.perf_counter() - start) * len(paths) / len(npz_paths)
        evict(paths)
        results["key (cold)"] = timed(jobs, checks["key"])
        evict(paths)
        results["key+crc32 (cold)"] = timed(jobs, checks["key+crc32"])
    print(f"{'check':<22}{'ms/image':>10}{'total s':>10}   (for {len(paths)} images)")
    for name, seconds in results.items():
        print(f"{name:<22}{seconds * 1000 / len(paths):>10.3f}{seconds:>10.2f}")
    extra = (results["key+crc32"] - results["key"]) * 1000 / len(paths)
    print(f"content hash adds {extra:.3f} ms/image with the images in the page cache")
    if args.json:
        args.json.write_text(json.dumps({"images": len(paths), "mean_bytes": float(np.mean(sizes)), **results}) + "\n")


if __name__ == "__main__":
    main()
