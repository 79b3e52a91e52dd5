"""WD14 tagging throughput: finetune/tag_images_by_wd14_tagger.py against a plain batched onnxruntime loop over the
same images, in the same run.

    python benchmarks/tagging_bench.py [--images 256] [--size 640x480] [--batch_size 8] [--repeat 2] [--quick]

Both use the tiny ONNX tagger of tests/tiny_tagger.py at WD14's 448x448 input, so the model costs almost nothing
and the figures show what the pipeline around it costs: decoding, padding to a white square, resizing, BGR float
batches, the onnxruntime call and writing tag files. The loop is what one would write by hand (sd-scripts' default
path: decode in the main thread, numpy padding, one ``session.run`` per batch). Tag files of both runs are compared.
Ratios above 1 mean ours is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.tag_images_by_wd14_tagger import main as tag_main  # noqa: E402
from library.cli import run_cli  # noqa: E402
from library.prep.tag_order import TagOptions, select_tags  # noqa: E402
from library.prep.tagger import read_tag_table  # noqa: E402
from tests.tiny_tagger import make_tiny_tagger  # noqa: E402

WD14_SIZE = 448


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Blocky random JPEGs (photo-like decode cost, varied tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        pixels = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
        path = folder / f"img{n:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def plain_preprocess(path: Path) -> np.ndarray:
    """sd-scripts' WD14 preprocessing written out: RGB, BGR, numpy pad to a white square, resize, float32."""
    image = Image.open(path).convert("RGB")
    pixels = np.asarray(image)[:, :, ::-1]
    side = max(pixels.shape[:2])
    pad_y, pad_x = side - pixels.shape[0], side - pixels.shape[1]
    pixels = np.pad(
        pixels, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), constant_values=255
    )
    method = Image.Resampling.BOX if side >= WD14_SIZE else Image.Resampling.LANCZOS
    resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((WD14_SIZE, WD14_SIZE), method)
    return np.asarray(resized).astype(np.float32)


def plain_loop(images: list[Path], model: Path, batch_size: int) -> None:
    """A hand-written batched tagging loop writing ``.txt`` files with the default thresholds."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    table = read_tag_table(model / "selected_tags.csv")
    options = TagOptions()
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        probs = session.run(None, {name: np.stack([plain_preprocess(p) for p in chunk])})[0]
        for path, scores in zip(chunk, probs):
            path.with_suffix(".txt").write_text(", ".join(select_tags(scores.tolist(), table, options)) + "\n")


def ours(folder: Path, model: Path, batch_size: int, workers: int | None) -> None:
    """The real script, in this process (its progress bar and log go to a buffer)."""
    argv = [str(folder), "--model_dir", str(model), "--batch_size", str(batch_size)]
    if workers is not None:
        argv += ["--max_data_loader_n_workers", str(workers)]
    with contextlib.redirect_stderr(io.StringIO()):
        code = run_cli(tag_main, argv)
    if code != 0:
        raise SystemExit(f"tag_images_by_wd14_tagger.py failed with exit code {code}")


def clear_tags(folder: Path) -> dict[str, str]:
    """Read and remove the tag files, so the next run tags every image again."""
    texts = {}
    for path in sorted(folder.glob("*.txt")):
        texts[path.name] = path.read_text()
        path.unlink()
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=str, default="640x480", help="image width x height")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="ours: --max_data_loader_n_workers (default 2)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each; the best is reported")
    parser.add_argument("--quick", action="store_true", help="32 images, one run each: checks that it runs")
    args = parser.parse_args()
    count, repeat = (32, 1) if args.quick else (args.images, args.repeat)
    width, height = (int(v) for v in args.size.lower().split("x"))

    root = Path(tempfile.mkdtemp(prefix="tagbench-"))
    try:
        model = make_tiny_tagger(root / "model", size=WD14_SIZE)
        images = make_images(root / "images", count, (width, height))
        best = {"plain loop": float("inf"), "ours": float("inf")}
        outputs = {}
        for _ in range(repeat):
            for label, run in (
                ("plain loop", lambda: plain_loop(images, model, args.batch_size)),
                ("ours", lambda: ours(root / "images", model, args.batch_size, args.workers)),
            ):
                start = time.perf_counter()
                run()
                best[label] = min(best[label], time.perf_counter() - start)
                outputs[label] = clear_tags(root / "images")
        print(f"{count} images of {width}x{height}, tagger input {WD14_SIZE}x{WD14_SIZE}, batch {args.batch_size}")
        for label, seconds in best.items():
            print(f"  {label:<11} {count / seconds:8.1f} images/s ({seconds:.2f} s, best of {repeat})")
        print(f"  ratio ours/plain: {best['plain loop'] / best['ours']:.2f}x")
        same = outputs["ours"] == outputs["plain loop"] and len(outputs["ours"]) == count
        print(f"  tag files identical: {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
