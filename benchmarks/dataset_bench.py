"""Dataset throughput: image scanning and latent caching, each against a plain hand-written loop in the same run.

    python benchmarks/dataset_bench.py [--images 3000] [--cache_images 256] [--vae_batch_size 8] [--threads 1]

Generates small PNG images in a temporary folder, then reports images/s for
  * scanning (``scan_dataset``: list, read sizes from headers, look up captions) vs a loop of ``Image.open().size``;
  * latent caching in memory and to disk (``cache_latents``) vs a loop of PIL open + ``vae.encode`` with the same
    batch size, and re-checking an existing disk cache.
Ratios above 1 mean ours is faster. Uses the bundled tiny VAE, so it runs offline in well under two minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.dataset.latent_cache import CacheJob, cache_latents  # noqa: E402
from library.dataset.scan import scan_dataset  # noqa: E402
from library.dataset.types import DatasetConfig, SubsetConfig  # noqa: E402
from library.models.tiny import make_tiny_model  # noqa: E402


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        path = folder / f"img{n:05d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        (folder / f"img{n:05d}.txt").write_text(f"a photo, tag{n % 17}")
        paths.append(path)
    return paths


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def plain_scan(folder: Path) -> list[tuple[Path, tuple[int, int], str]]:
    out = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            size = image.size
        caption = path.with_suffix(".txt").read_text().strip()
        out.append((path, size, caption))
    return out


def plain_cache(paths: list[Path], vae: torch.nn.Module, batch_size: int) -> list[torch.Tensor]:
    latents = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents.extend(vae.encode(pixels).latent_dist.sample().cpu())
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--cache_images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae_batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a busy box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    vae = make_tiny_model().vae
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "1_bench"
        t, paths = timed(lambda: make_images(folder, args.images, size))
        print(f"generated {len(paths)} images of {size[0]}x{size[1]} in {t:.1f} s")

        dataset = DatasetConfig(
            "bench", "dreambooth", (SubsetConfig("bench", folder, caption_extension=".txt"),), resolution=size
        )
        plain_scan(folder)  # warm the file-system cache for both
        t_plain, plain = timed(lambda: plain_scan(folder))
        t_ours, scanned = timed(lambda: scan_dataset(dataset))
        assert len(scanned.records) == len(plain) == len(paths)
        print(
            f"scan:  ours {len(paths) / t_ours:9.0f} img/s | plain loop {len(paths) / t_plain:9.0f} img/s | "
            f"ratio {t_plain / t_ours:.2f}"
        )

        subset = paths[: args.cache_images]
        jobs = [CacheJob(p, size, size, size) for p in subset]
        n, bs = len(subset), args.vae_batch_size
        plain_cache(subset[:bs], vae, bs)  # warm-up
        t_plain, _ = timed(lambda: plain_cache(subset, vae, bs))
        t_mem, report = timed(lambda: cache_latents(jobs, vae, to_disk=False, batch_size=bs, progress=False))
        assert report.encoded == n
        t_disk, report = timed(lambda: cache_latents(jobs, vae, to_disk=True, batch_size=bs, progress=False))
        assert report.encoded == n
        t_check, report = timed(lambda: cache_latents(jobs, vae, to_disk=True, batch_size=bs, progress=False))
        assert report.reused == n
        print(f"cache ({n} images, vae_batch_size {bs}):")
        print(f"  plain loop (PIL open + vae.encode)  {n / t_plain:9.0f} img/s")
        print(f"  ours, memory                        {n / t_mem:9.0f} img/s | ratio {t_plain / t_mem:.2f}")
        print(f"  ours, disk (write npz)              {n / t_disk:9.0f} img/s | ratio {t_plain / t_disk:.2f}")
        print(f"  ours, disk (reuse, checks keys)     {n / t_check:9.0f} img/s | ratio {t_plain / t_check:.2f}")


if __name__ == "__main__":
    main()
