"""benchmarks/train_bench.py: its step timing arithmetic, and a --quick run that must print and save its figures."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "train_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", SCRIPT)
    module = sys.modules.get("train_bench")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_bench"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return module


def figures(bench, label: str, rate: float, cpu_rate: float, first: float, rss: float):
    return bench.Figures(label, 100, rate, cpu_rate, first, rss, 30.0, 20.0, 1.0, 1.0)


def test_step_marks_reads_tqdm_bars_and_baseline_lines():
    bench = load_bench()
    buf = io.StringIO()
    bar = tqdm(total=3, file=buf, desc="steps", mininterval=0, ascii=False)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(avr_loss="0.1234")
    bar.close()
    assert sorted(set(bench.step_marks(buf.getvalue()))) == [0, 1, 2, 3]
    assert bench.step_marks("caching latents: 100%|##| 32/32\nsteps: 7/150 loss 0.5\nsteps: 8/150 loss 0.4\n") == [7, 8]


def test_steady_rate_skips_the_warmup():
    bench = load_bench()
    marks = [(1, 5.0), (2, 5.5), (10, 7.0), (20, 9.0)]
    # total 20 -> warm-up of 2 steps: from (2, 5.5) to (20, 9.0) = 18 steps in 3.5 s
    assert bench.steady_rate(marks, 20) == 18 / 3.5
    # total 100 -> warm-up of 10 steps: from (10, 7.0) to (20, 9.0)
    assert bench.steady_rate(marks, 100) == 10 / 2.0
    assert math.isnan(bench.steady_rate([(1, 5.0)], 20))
    assert math.isnan(bench.steady_rate([], 20))


def test_comparison_lines_judge_the_targets():
    bench = load_bench()
    base = figures(bench, "hand-written loop", 5.0, 4.0, 10.0, 500.0)
    fast = figures(bench, "ours", 4.9, 3.0, 12.0, 550.0)
    lines = bench.comparison_lines(fast, base, 3.0)
    assert lines[1].split() == ["hand-written", "loop", "5.00", "4.00", "10.00", "500", "100", "1.0-1.0"]
    assert lines[3].split() == ["ours", "/", "baseline", "0.98x", "0.75x", "+2.00s", "1.10x"]
    assert lines[5].endswith("steps/s MET (per CPU-second MISSED), launch->1st step MET")
    slow = figures(bench, "ours", 4.7, 3.9, 13.5, 550.0)
    assert bench.comparison_lines(slow, base, 3.0)[5].endswith(
        "steps/s MISSED (per CPU-second MET), launch->1st step MISSED"
    )


def test_children_report_peak_cuda_memory_in_a_line_the_parent_reads():
    bench = load_bench()
    assert bench.PEAK_CUDA_LINE.match("peak cuda MiB: 1234.5").group(1) == "1234.5"
    assert bench.PEAK_CUDA_LINE.match("steps: 3/10 peak cuda MiB: 12") is None
    assert math.isnan(figures(bench, "ours", 1.0, 1.0, 1.0, 1.0).peak_cuda_mib)
    settings = bench.Settings(steps=3, batch_size=2, model="tiny-sdxl")
    command = bench.trainer_command(Path("d.toml"), Path("out"), settings, [])
    assert command[1:4] == [str(SCRIPT), "--trainer_child", "sdxl_train_network.py"]
    assert command[command.index("--pretrained_model_name_or_path") + 1] == "tiny-sdxl"
    assert bench.baseline_command(Path("images"), settings)[-2:] == ["--model", "tiny-sdxl"]


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_quick_run_prints_and_saves_figures(tmp_path, model):
    """Both children run for real; 4 steps of batch 2 (under --quick's cap of 10) keep it cheap."""
    out = tmp_path / "figures.json"
    small = ["--steps", "4", "--batch_size", "2"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *small, "--threads", "1", "--model", model, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ours / baseline" in done.stdout
    assert "load average" in done.stdout
    result = json.loads(out.read_text())
    assert result["settings"]["steps"] == 4
    assert result["settings"]["batch_size"] == 2
    assert result["settings"]["model"] == model
    script = {"tiny-sd1": "train_network.py", "tiny-sdxl": "sdxl_train_network.py"}[model]
    assert result["small"]["ours"]["label"] == f"{script} (defaults)"
    for run in ("baseline", "ours"):
        figures = result["small"][run]
        assert figures["steps_done"] == 4
        assert figures["steps_per_s"] > 0
        # 4 steps can be too few to time on CPU when the suite loads the machine (NaN, see Figures); never <= 0
        assert not figures["steps_per_cpu_s"] <= 0
        assert 0 < figures["cpu_s"] < 4 * figures["wall_s"]  # seconds, like wall_s (one torch thread)
        assert 0 < figures["first_step_s"] < figures["wall_s"]
        assert figures["peak_rss_mib"] > 100
