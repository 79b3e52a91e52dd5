"""Images/s of ``finetune/prepare_buckets_latents.py`` against the training cache path (``--cache_latents_to_disk``
through the dataset), on the same images with the same tiny VAE, in one run.

    python benchmarks/prepare_latents_bench.py [--quick] [--images 192] [--repeats 3] [--json out.json]

Writes ``--images`` PNG files of mixed sizes and aspect ratios (smooth content with noise) to a temporary folder,
then, ``--repeats`` times with the order alternating, times from a cold start (no npz files):
  * ``prepare``: ``prepare_latents`` (the script's work: VAE load, header sizes, bucketing, encoding, npz and
    metadata writing), ``--batch_size 4``;
  * ``training cache``: ``build_train_dataset`` of a DreamBooth subset of the same folder with the same buckets,
    ``cache_latents_to_disk`` and ``vae_batch_size`` 4, plus loading the VAE;
and the same two again with every file in place (``--skip_existing`` / the cache's reuse check): the cost of a
resumed run. One untimed warm-up round first; the order alternates between rounds. Reports the best time of each
and images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import toml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config.dataset_config import DatasetFlags  # noqa: E402
from library.dataset.loader import build_train_dataset  # noqa: E402
from library.models.load import load_model  # noqa: E402
from library.prep.latents import LatentsJob, prepare_latents  # noqa: E402

SIZES = [(160, 128), (128, 160), (144, 144), (192, 112), (112, 192), (176, 136)]
BUCKETS = {"min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 32}


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for n in range(count):
        w, h = SIZES[n % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) * rng.uniform(0.5, 1.0, 3)
        pixels = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{n:04d}.png")


def clean(folder: Path) -> None:
    for path in folder.glob("*.npz"):
        path.unlink()


def run_prepare(folder: Path, meta: Path, skip_existing: bool) -> None:
    meta.write_text("{}")
    flags = {k: v for k, v in BUCKETS.items()}
    prepare_latents(
        LatentsJob(
            str(folder),
            str(meta),
            str(meta),
            "tiny-sd1",
            batch_size=4,
            max_resolution="128,128",
            skip_existing=skip_existing,
            device="cpu",
            **flags,
        )
    )


def run_training_cache(config: Path) -> None:
    vae = load_model("tiny-sd1").vae
    flags = DatasetFlags(dataset_config=str(config), cache_latents_to_disk=True, vae_batch_size=4)
    build_train_dataset(flags, {"dreambooth"}, vae, seed=0, progress=False)


def timed(before: Callable[[], None], run: Callable[[], None]) -> float:
    before()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_of(repeats: int, runs: dict[str, tuple[Callable[[], None], Callable[[], None]]]) -> dict[str, float]:
    """The best time of each run over ``repeats`` rounds, after one untimed warm-up round; the order alternates."""
    best = {label: float("inf") for label in runs}
    labels = list(runs)
    for round_ in range(repeats + 1):
        for label in labels if round_ % 2 else labels[::-1]:
            seconds = timed(*runs[label])
            if round_:
                best[label] = min(best[label], seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="24 images, 1 repeat (a smoke run)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    count, repeats = (24, 1) if args.quick else (args.images, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "img"
        folder.mkdir()
        make_images(folder, count)
        meta = root / "meta.json"
        subset = {"image_dir": folder.as_posix()}
        dataset = {"resolution": 128, "enable_bucket": True, **BUCKETS, "subsets": [subset]}
        config = root / "dataset.toml"
        config.write_text(toml.dumps({"datasets": [dataset]}))
        cold = best_of(
            repeats,
            {
                "prepare": (lambda: clean(folder), lambda: run_prepare(folder, meta, False)),
                "training cache": (lambda: clean(folder), lambda: run_training_cache(config)),
            },
        )
        resumed = best_of(
            repeats,
            {
                "prepare, resumed": (lambda: None, lambda: run_prepare(folder, meta, True)),
                "training cache, resumed": (lambda: None, lambda: run_training_cache(config)),
            },
        )
        results = {**cold, **resumed}
    print(f"{count} images, best of {repeats}")
    print(f"{'path':<26}{'seconds':>9}{'images/s':>10}")
    for label, seconds in results.items():
        print(f"{label:<26}{seconds:>9.2f}{count / seconds:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": count, "repeats": repeats, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
