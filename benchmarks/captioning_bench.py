"""Captioning throughput on CPU: our captioning path (``make_captions.py`` / ``make_captions_by_git.py``) against a
plain batched loop over the same tiny model and the same images, in the same run.

    python benchmarks/captioning_bench.py [--images 64] [--batch_size 8] [--repeat 3] [--threads 1] [--quick]

Builds the tiny random-weight BLIP and GIT models of the tests, writes PNG images to a temporary folder, then times
three cases, each after the model is loaded (loading is the same ``from_pretrained`` for both):
  * BLIP nucleus sampling (sd-scripts' default; ``--min_length`` = ``--max_length`` so every caption has the same
    number of tokens in both runs, whatever is drawn);
  * BLIP beam search (``--beam_search --num_beams 3``);
  * GIT greedy search.
"ours" is ``library.prep.captioning.caption_folder`` with the scripts' captioners: threaded image decoding, resume
check, atomic caption writes, per-image seeded sampling. "plain" opens each image with PIL, runs processor +
``generate`` per batch and writes each caption with ``open().write``. Runs alternate plain / ours; the best of each is
reported, as images per wall second and per CPU second of this process (all its threads; steadier on a busy
machine). Ratios above 1 mean ours is faster. For the deterministic cases it also checks both wrote the same captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.prep import captioning as cap  # noqa: E402
from library.prep.common import find_images  # noqa: E402
from tests.tiny_captioners import make_tiny_blip, make_tiny_git  # noqa: E402

LENGTH = 24


def make_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(count):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(folder / f"img{n:05d}.png", compress_level=1)


def plain_loop(folder: Path, batch_size: int, generate: Callable[[list[Image.Image]], list[str]]) -> None:
    """The hand-written baseline: PIL open, generate per batch, write ``<stem>.plain``."""
    paths = sorted(folder.glob("*.png"))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [Image.open(p).convert("RGB") for p in chunk]
        for path, text in zip(chunk, generate(images)):
            with open(path.with_suffix(".plain"), "w", encoding="utf-8") as f:
                f.write(text + "\n")


def cases(models: Path, folder: Path, device: torch.device) -> dict[str, tuple[cap.Captioner, Callable]]:
    """Each case: our captioner (as the script builds it) and the plain loop's generate function."""
    blip, blip_processor = cap.load_blip(str(models / "blip"), device)
    git, git_processor = cap.load_git(str(models / "git"), device)

    def blip_plain(**kwargs) -> Callable[[list[Image.Image]], list[str]]:
        def run(images: list[Image.Image]) -> list[str]:
            inputs = blip_processor(images=images, text=[cap.BLIP_PROMPT] * len(images), return_tensors="pt")
            with torch.inference_mode():
                ids = blip.generate(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids, **kwargs)
            return [cap.strip_prompt(t) for t in blip_processor.batch_decode(ids, skip_special_tokens=True)]

        return run

    def git_plain(images: list[Image.Image]) -> list[str]:
        inputs = git_processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            ids = git.generate(pixel_values=inputs.pixel_values, max_length=LENGTH)
        return git_processor.batch_decode(ids, skip_special_tokens=True)

    sample = cap.BlipOptions(max_length=LENGTH, min_length=LENGTH)
    beam = cap.BlipOptions(beam_search=True, num_beams=3, max_length=LENGTH, min_length=5)
    limits = dict(max_length=LENGTH, repetition_penalty=1.1)
    return {
        "BLIP sampling": (
            cap.blip_captioner(blip, blip_processor, sample, folder, device),
            blip_plain(do_sample=True, top_p=0.9, top_k=50, min_length=LENGTH, **limits),
        ),
        "BLIP beam search": (
            cap.blip_captioner(blip, blip_processor, beam, folder, device),
            blip_plain(num_beams=3, max_length=LENGTH, min_length=5, repetition_penalty=1.0),
        ),
        "GIT greedy": (
            cap.git_captioner(git, git_processor, cap.GitOptions(max_length=LENGTH), device),
            git_plain,
        ),
    }


def already(captioner: cap.Captioner) -> Callable[[], cap.Captioner]:
    """``caption_folder`` loads its model lazily; here it is loaded once, before any timing."""
    return lambda: captioner


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) spent in ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(folder: Path, count: int, batch_size: int, repeat: int, models: Path) -> list[dict]:
    """Alternate plain / ours ``repeat`` times per case; the best wall and CPU time of each, as images/s."""
    device = torch.device("cpu")
    run = cap.CaptionRun(folder, ".caption", overwrite=True, batch_size=batch_size, workers=2)
    images = find_images(folder)
    results = []
    for name, (ours, plain) in cases(models, folder, device).items():
        best = {k: [float("inf"), float("inf")] for k in ("plain", "ours")}
        for _ in range(repeat):
            rounds = {
                "plain": timed(partial(plain_loop, folder, batch_size, plain)),
                "ours": timed(partial(cap.caption_folder, run, already(ours), name)),
            }
            for key, (wall, cpu) in rounds.items():
                best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]
        same = None
        if name != "BLIP sampling":
            same = all(p.with_suffix(".caption").read_text() == p.with_suffix(".plain").read_text() for p in images)
        results.append(
            {
                "case": name,
                "plain_images_per_s": count / best["plain"][0],
                "ours_images_per_s": count / best["ours"][0],
                "ratio": best["plain"][0] / best["ours"][0],
                "plain_images_per_cpu_s": count / best["plain"][1],
                "ours_images_per_cpu_s": count / best["ours"][1],
                "cpu_ratio": best["plain"][1] / best["ours"][1],
                "same_captions": same,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the processors resize to 32)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="16 images, one round: checks that it runs")
    parser.add_argument("--json", type=str, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeat = 16, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="capbench-") as tmp:
        root = Path(tmp)
        make_tiny_blip(root / "models" / "blip")
        make_tiny_git(root / "models" / "git")
        make_images(root / "images", args.images, args.size)
        results = measure(root / "images", args.images, args.batch_size, args.repeat, root / "models")
    print(f"\n{args.images} images of {args.size} px, batch {args.batch_size}, {args.threads} torch thread(s), CPU")
    head = f"{'img/s plain':>12} {'ours':>7} {'ratio':>6} {'img/CPU-s plain':>16} {'ours':>7} {'ratio':>6}"
    print(f"{'case':<18} {head}  same captions")
    for r in results:
        same = {None: "n/a (sampled)", True: "yes", False: "NO"}[r["same_captions"]]
        print(
            f"{r['case']:<18} {r['plain_images_per_s']:>12.1f} {r['ours_images_per_s']:>7.1f} {r['ratio']:>5.2f}x "
            f"{r['plain_images_per_cpu_s']:>16.1f} {r['ours_images_per_cpu_s']:>7.1f} {r['cpu_ratio']:>5.2f}x  {same}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
