"""Training speed: ``train_network.py`` / ``sdxl_train_network.py`` (LoRA, cached latents) against a minimal
hand-written PyTorch loop.

    python benchmarks/train_bench.py [--model tiny-sd1|tiny-sdxl] [--steps 150] [--images 32] [--batch_size 4]
                                     [--repeat 1] [--threads N] [--large_images 2000] [--workers 2] [--quick]
                                     [--json figures.json]

Generates a dataset of small PNG images with captions in a temporary folder, then runs as separate processes
(so start-up costs compare) with the same model (the bundled ``tiny-sd1``, or ``tiny-sdxl`` with
``sdxl_train_network.py``), LoRA (rank 8, UNet and text encoders, as the scripts train by default), batch size,
optimizer (AdamW, gradient clipping at 1.0) and step count:

  * the training script with ``--cache_latents`` and every other setting, data-loader workers included, at its
    default;
  * a hand-written loop: build the model, apply the LoRA, encode the latents once, then per step encode the
    captions, add noise, UNet forward, MSE loss, backward, AdamW step (SDXL: ``sdxl_loop.py``).

For each it reports steady steps/s (after a 10 % warm-up), the time from launch to the end of the first step, the
process's peak RSS and, on a GPU, ``torch.cuda.max_memory_allocated``, then the ratios ours / baseline against the
targets (>= 0.95x the steps/s, first step at most
``--first_step_margin`` seconds later). Step times are taken in this process when each child prints a step (the
trainer's progress bar, the baseline's ``steps: k/N`` lines), so both are timed the same way. The machine's load
average is printed with the figures: on a shared machine they are noisy, so compare runs taken at similar load.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_CUDA_LINE = re.compile(r"^peak cuda MiB: ([0-9.]+)$")
TRAINERS = {"tiny-sd1": "train_network.py", "tiny-sdxl": "sdxl_train_network.py"}
STEP_LINE = re.compile(r"steps:(?:[^|\r\n]*\|[^|\r\n]*\|)?\s*(\d+)/(\d+)")
STEADY_TARGET = 0.95
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class Settings:
    """What both runs train: same model, LoRA, batch, optimizer and steps."""

    steps: int
    batch_size: int
    network_dim: int = 8
    network_alpha: float = 8.0
    learning_rate: float = 1e-4
    seed: int = 0
    resolution: int = 64
    model: str = "tiny-sd1"

    @property
    def trainer(self) -> str:
        """The training script for the model."""
        return TRAINERS[self.model]


@dataclass(frozen=True)
class Figures:
    """One child run: steady steps/s, seconds from launch to the first finished step, peak RSS in MiB.

    ``steps_per_cpu_s`` is steps per second of the process's own CPU time (all its threads, not worker processes):
    much less disturbed by other load than wall-clock steps/s, so it is the figure to trust on a busy machine.
    It is NaN when the run is too short to measure it: the step marks are read as the output arrives, so on a busy
    machine two marks can both be read after the child's work is done. ``cpu_s`` is the child's whole CPU time (user +
    system, from ``wait4``). ``peak_cuda_mib`` is ``torch.cuda.max_memory_allocated`` at the end of the run (NaN
    without a GPU).
    """

    label: str
    steps_done: int
    steps_per_s: float
    steps_per_cpu_s: float
    first_step_s: float
    peak_rss_mib: float
    wall_s: float
    cpu_s: float
    load_before: float
    load_after: float
    peak_cuda_mib: float = float("nan")


def make_dataset(folder: Path, count: int, size: int) -> Path:
    """``count`` PNG images (8x8 random blocks, so PNG decoding is cheap) with ``.txt`` captions; returns the folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cells = max(size // 8, 1)
    for n in range(count):
        pixels = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(folder / f"img{n:05d}.png", compress_level=1)
        (folder / f"img{n:05d}.txt").write_text(f"a photo of sks frog, tag{n % 17}, style{n % 5}")
    return folder


def dataset_toml(image_dir: Path, settings: Settings) -> str:
    """A dataset config with one subset, no buckets, so every batch has the same shape as the baseline's."""
    return (
        "[[datasets]]\n"
        f"resolution = {settings.resolution}\n"
        f"batch_size = {settings.batch_size}\n"
        "enable_bucket = false\n\n"
        "  [[datasets.subsets]]\n"
        f"  image_dir = '{image_dir.as_posix()}'\n"
        "  caption_extension = '.txt'\n"
        "  num_repeats = 1\n"
    )


def trainer_command(config: Path, output_dir: Path, settings: Settings, extra: list[str]) -> list[str]:
    """The training script (run by ``--trainer_child``, which reports its peak CUDA memory) with only what the
    comparison fixes; everything else stays at its default."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--trainer_child",
        settings.trainer,
        "--pretrained_model_name_or_path",
        settings.model,
        "--dataset_config",
        str(config),
        "--cache_latents",
        "--output_dir",
        str(output_dir),
        "--output_name",
        "bench",
        "--network_module",
        "networks.lora",
        "--network_dim",
        str(settings.network_dim),
        "--network_alpha",
        str(settings.network_alpha),
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        str(settings.learning_rate),
        "--max_train_steps",
        str(settings.steps),
        "--seed",
        str(settings.seed),
        *extra,
    ]


def baseline_command(image_dir: Path, settings: Settings) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--baseline_child",
        str(image_dir),
        "--steps",
        str(settings.steps),
        "--batch_size",
        str(settings.batch_size),
        "--seed",
        str(settings.seed),
        "--model",
        settings.model,
    ]


def step_marks(text: str) -> list[int]:
    """The step counts printed in ``text`` (tqdm bars or ``steps: k/N`` lines), in order."""
    return [int(m.group(1)) for m in STEP_LINE.finditer(text)]


def steady_rate(marks: list[tuple[int, float]], total: int) -> float:
    """Steps per second between the first mark at or after the warm-up and the last mark.

    ``marks`` are (step count, seconds) pairs, the time each count was first seen; the warm-up is the first
    ``WARMUP_FRACTION`` of ``total`` steps (at least one), so graph building and allocator growth are left out.
    """
    warmup = max(1, int(total * WARMUP_FRACTION))
    start = next(((k, t) for k, t in marks if k >= warmup), None)
    end = marks[-1] if marks else None
    if start is None or end is None or end[0] <= start[0] or end[1] <= start[1]:
        return float("nan")
    return (end[0] - start[0]) / (end[1] - start[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all threads), from ``/proc``; NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(label: str, command: list[str], env: dict[str, str], total: int, log: Path) -> Figures:
    """Run ``command``, time each new step count it prints, and take its peak RSS from ``wait4``.

    ``log`` gets every output line (progress-bar redraws included) prefixed by its arrival time in seconds since
    launch, which shows where start-up time goes.
    """
    load_before = os.getloadavg()[0]
    launch = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    marks: list[tuple[int, float]] = []
    cpu_marks: list[tuple[int, float]] = []
    pending, timed_lines, peak_cuda = "", [], float("nan")
    fd = proc.stdout.fileno()
    while True:
        select.select([fd], [], [])
        data = os.read(fd, 65536)
        now = time.perf_counter() - launch
        pending += decoder.decode(data, final=not data)
        lines = re.split(r"[\r\n]", pending)
        pending = lines.pop() if data else ""
        for line in filter(None, lines):
            timed_lines.append(f"{now:9.3f} {line}")
            cuda_line = PEAK_CUDA_LINE.match(line.strip())
            peak_cuda = float(cuda_line.group(1)) if cuda_line else peak_cuda
            for k in step_marks(line):
                if k > (marks[-1][0] if marks else 0):
                    marks.append((k, now))
                    cpu_marks.append((k, cpu_seconds(proc.pid)))
        if not data:
            break
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - launch
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    log.write_text("\n".join(timed_lines) + "\n")
    if proc.returncode != 0:
        tail = "\n".join(timed_lines[-30:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}); its output is in {log}:\n{tail}")
    return Figures(
        label=label,
        steps_done=marks[-1][0] if marks else 0,
        steps_per_s=steady_rate(marks, total),
        steps_per_cpu_s=steady_rate(cpu_marks, total),
        first_step_s=marks[0][1] if marks else float("nan"),
        peak_rss_mib=usage.ru_maxrss / 1024,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        peak_cuda_mib=peak_cuda,
    )


def best_of(runs: list[Figures]) -> Figures:
    """The fastest figures over repeats (least disturbed by other load): max steps/s, min first step and RSS."""
    first = runs[0]
    return Figures(
        label=first.label,
        steps_done=min(r.steps_done for r in runs),
        steps_per_s=max(r.steps_per_s for r in runs),
        steps_per_cpu_s=max(r.steps_per_cpu_s for r in runs),
        first_step_s=min(r.first_step_s for r in runs),
        peak_rss_mib=min(r.peak_rss_mib for r in runs),
        wall_s=min(r.wall_s for r in runs),
        cpu_s=min(r.cpu_s for r in runs),
        load_before=max(r.load_before for r in runs),
        load_after=max(r.load_after for r in runs),
        peak_cuda_mib=min(r.peak_cuda_mib for r in runs),
    )


def figures_row(f: Figures) -> str:
    load = f"{f.load_before:.1f}-{f.load_after:.1f}"
    figures = f"{f.steps_per_s:9.2f} {f.steps_per_cpu_s:11.2f} {f.first_step_s:19.2f} {f.peak_rss_mib:13.0f}"
    return f"{f.label:33} {figures} {f.steps_done:6d} {load:>11}"


def ratio_row(label: str, ours: Figures, base: Figures) -> str:
    rate = ours.steps_per_s / base.steps_per_s
    cpu_rate = ours.steps_per_cpu_s / base.steps_per_cpu_s
    later = ours.first_step_s - base.first_step_s
    rss = ours.peak_rss_mib / base.peak_rss_mib
    return f"{label:33} {rate:8.2f}x {cpu_rate:10.2f}x {later:+18.2f}s {rss:12.2f}x"


def comparison_lines(ours: Figures, base: Figures, margin: float) -> list[str]:
    """The table of both runs, the ratios ours / baseline and whether each target is met."""

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    wall_ok = verdict(ours.steps_per_s / base.steps_per_s >= STEADY_TARGET)
    cpu_ok = verdict(ours.steps_per_cpu_s / base.steps_per_cpu_s >= STEADY_TARGET)
    first_ok = verdict(ours.first_step_s - base.first_step_s <= margin)
    header = f"{'steps/s':>9} {'steps/CPU-s':>11} {'launch->1st step s':>19} {'peak RSS MiB':>13}"
    return [
        f"{'':33} {header} {'steps':>6} {'load':>11}",
        figures_row(base),
        figures_row(ours),
        ratio_row("ours / baseline", ours, base),
        f"{'target':33} {'>=' + str(STEADY_TARGET) + 'x':>9} {'':11} {'<= +' + str(margin) + ' s':>19}",
        f"{'verdict':33} steps/s {wall_ok} (per CPU-second {cpu_ok}), launch->1st step {first_ok}",
    ]


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def compare(name: str, image_dir: Path, work: Path, settings: Settings, args: argparse.Namespace) -> dict:
    """Baseline and trainer (alternating, ``--repeat`` times each) on one dataset; prints and returns the figures."""
    config = work / f"{name}.toml"
    config.write_text(dataset_toml(image_dir, settings))
    env = child_env(args.threads)
    runs: dict[str, list[Figures]] = {"base": [], "ours": [], "workers": []}
    for r in range(args.repeat):
        runs["base"].append(
            run_child(
                "hand-written loop",
                baseline_command(image_dir, settings),
                env,
                settings.steps,
                work / f"{name}-base-{r}.log",
            )
        )
        runs["ours"].append(
            run_child(
                f"{settings.trainer} (defaults)",
                trainer_command(config, work / f"out-{name}-{r}", settings, []),
                env,
                settings.steps,
                work / f"{name}-ours-{r}.log",
            )
        )
        if args.workers:
            extra = ["--max_data_loader_n_workers", str(args.workers), "--persistent_data_loader_workers"]
            runs["workers"].append(
                run_child(
                    f"{settings.trainer} ({args.workers} workers)",
                    trainer_command(config, work / f"out-{name}-w{r}", settings, extra),
                    env,
                    settings.steps,
                    work / f"{name}-workers-{r}.log",
                )
            )
    base, ours = best_of(runs["base"]), best_of(runs["ours"])
    print(
        f"\n== {name}: {len(list(image_dir.glob('*.png')))} images, {settings.steps} steps, "
        f"batch {settings.batch_size}, LoRA dim {settings.network_dim}, AdamW, {settings.model}; best of {args.repeat}"
    )
    for line in comparison_lines(ours, base, args.first_step_margin):
        print(line)
    if base.peak_cuda_mib == base.peak_cuda_mib:  # not NaN: the children ran on a GPU
        print(f"peak CUDA memory MiB: baseline {base.peak_cuda_mib:.0f}, ours {ours.peak_cuda_mib:.0f}")
    result = {"baseline": asdict(base), "ours": asdict(ours)}
    if runs["workers"]:
        workers = best_of(runs["workers"])
        print(figures_row(workers))
        print(ratio_row("workers / default", workers, ours))
        result["workers"] = asdict(workers)
    return result


def print_peak_cuda() -> None:
    """The line the parent reads a child's peak CUDA memory from (nothing without a GPU)."""
    import torch

    if torch.cuda.is_available():
        print(f"peak cuda MiB: {torch.cuda.max_memory_allocated() / 2**20:.1f}", flush=True)


def trainer_child(script: str, argv: list[str]) -> None:
    """Run the training script's ``main(argv)`` in this process, then report its peak CUDA memory."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)
    print_peak_cuda()


def baseline_child(image_dir: Path, settings: Settings) -> None:
    """The hand-written loop; prints ``steps: k/N`` after each optimizer step (timed by the parent)."""
    if settings.model == "tiny-sdxl":
        from sdxl_loop import sdxl_baseline

        sdxl_baseline(
            image_dir,
            steps=settings.steps,
            batch_size=settings.batch_size,
            network_dim=settings.network_dim,
            network_alpha=settings.network_alpha,
            lr=settings.learning_rate,
            seed=settings.seed,
        )
        print_peak_cuda()
        return
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from library.models.tiny import make_tiny_model
    from networks.lora import create_network

    torch.manual_seed(settings.seed)
    c = make_tiny_model()
    for module in (c.unet, c.vae, c.text_encoder):
        module.requires_grad_(False)
        module.eval()
    print("model built", flush=True)
    paths = sorted(image_dir.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    with torch.no_grad():
        latents = []
        for start in range(0, len(paths), settings.batch_size):
            pixels = np.stack(
                [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + settings.batch_size]]
            )
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents.append(c.vae.encode(images).latent_dist.sample() * c.vae.config.scaling_factor)
        latents = torch.cat(latents)
    print(f"latents: {len(paths)} encoded", flush=True)
    ids = c.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    network = create_network(1.0, settings.network_dim, settings.network_alpha, c.vae, c.text_encoder, c.unet)
    network.apply_to(c.text_encoder, c.unet, True, True)
    groups = network.prepare_optimizer_params(None, None, settings.learning_rate)
    groups = groups[0] if isinstance(groups, tuple) else groups
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    batches_per_epoch = len(paths) // settings.batch_size
    step = 0
    while step < settings.steps:
        order = torch.randperm(len(paths))
        for b in range(batches_per_epoch):
            index = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x = latents[index]
            conditioning = c.text_encoder(ids[index])[0]
            noise = torch.randn_like(x)
            timesteps = torch.randint(0, c.scheduler.config.num_train_timesteps, (x.shape[0],))
            prediction = c.unet(c.scheduler.add_noise(x, noise, timesteps), timesteps, conditioning).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            print(f"steps: {step}/{settings.steps} loss {loss.item():.4f}", flush=True)
            if step >= settings.steps:
                return


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TRAINERS), default="tiny-sd1", help="tiny model (and script)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--images", type=int, default=32, help="images in the small dataset")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--large_images", type=int, default=0, help="also compare on a dataset this large (0: off)")
    parser.add_argument("--workers", type=int, default=0, help="also run ours with this many loader workers")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best figures are reported")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both children (default: unset)")
    parser.add_argument("--first_step_margin", type=float, default=3.0, help="allowed extra seconds to the 1st step")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images: checks that it runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, outputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline_child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.images, args.large_images, args.repeat = min(args.steps, 10), 8, 0, 1
    for name in ("steps", "images", "batch_size", "repeat", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more")
    if args.images % args.batch_size or args.large_images % args.batch_size:
        parser.error("--images and --large_images must be multiples of --batch_size (full batches in both loops)")
    return args


def run_all(args: argparse.Namespace, settings: Settings, work: Path) -> dict:
    """Both runs on the small dataset (and the large one when asked); returns every figure for ``--json``."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    print(
        f"machine: {cores} CPU(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; child threads: "
        f"{args.threads or 'torch default'}"
    )
    if load[0] > 0.75 * cores:
        hint = "" if args.threads else "; torch's default threads oversubscribe a busy CPU, try --threads 1"
        print(f"warning: the machine is busy; figures are noisy (compare runs taken at similar load){hint}")
    sets = [("small", args.images)] + ([("large", args.large_images)] if args.large_images else [])
    results = {"cpu_count": cores, "load_at_start": load[0], "threads": args.threads, "settings": asdict(settings)}
    for name, count in sets:
        image_dir = make_dataset(work / f"images-{count}", count, args.size)
        results[name] = compare(name, image_dir, work, settings, args)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trainer_child"]:
        trainer_child(argv[1], argv[2:])
        return
    args = parse_args(argv)
    settings = Settings(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, resolution=args.size, model=args.model
    )
    if args.baseline_child is not None:
        baseline_child(args.baseline_child, settings)
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run_all(args, settings, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
            results = run_all(args, settings, Path(tmp))
    if args.json is not None:
        sys.path.insert(0, str(REPO))
        from library.io import atomic_write_json

        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
