"""README's first command runs as written (shortened to a few steps: tests/test_learning_network.py checks that
the concept is learned), and every file in examples/ is used by a run a test makes or a docs example tests run.

The command runs in a subprocess from a scratch folder holding a copy of examples/, so its relative paths
(``output/tiny_lora``, ``examples/concept_dataset.toml``) resolve the way they do for a user in the repository root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import toml

from library.io import load_safetensors
from tests.conftest import REPO


def main_job() -> list[list[str]]:
    """README's first command after ``./install.sh``: the commands it chains with ``&&``, split into words."""
    return [shlex.split(part) for part in readme_commands()[0].split("&&")[1:]]


def readme_commands() -> list[str]:
    """The two commands README.md starts with (its first ``bash`` block)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def training_configs() -> list[Path]:
    """examples/*.toml files that are training config files (they name a base model)."""
    return sorted(p for p in (REPO / "examples").glob("*.toml") if "pretrained_model_name_or_path" in p.read_text())


def referenced_files(config: Path) -> set[Path]:
    """The example files a training config points at (dataset config, sample prompts), as repository paths."""
    flat = {k: v for section in toml.load(config).values() if isinstance(section, dict) for k, v in section.items()}
    return {(REPO / flat[key]).resolve() for key in ("dataset_config", "sample_prompts") if key in flat}


def test_readme_starts_with_install_and_run_then_install_and_test():
    first, second = readme_commands()
    assert first.startswith("./install.sh && ") and " --config_file examples/" in first
    assert second == "./install.sh --test && python3 -m pytest"
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "eval" in ci


def test_every_example_file_is_a_config_a_test_runs_or_used_by_one():
    used = {p.resolve() for p in training_configs()}
    for config in training_configs():
        used |= referenced_files(config)
    docs = " ".join(p.read_text(encoding="utf-8") for p in (REPO / "docs").glob("*.md"))
    files = {p.resolve() for p in (REPO / "examples").glob("*") if p.is_file()}
    unused = {p for p in files - used if f"examples/{p.name}" not in docs}
    assert unused == set(), "files in examples/ that no tested run or docs example uses"
    train = main_job()[0]
    assert {REPO / train[-1]} <= used


def test_readme_main_job_runs_as_written(tmp_path, capsys):
    """``train_network.py --config_file examples/tiny_lora.toml`` (cut to 4 steps, sampled at the end), then
    ``tools/concept_report.py``:
    LoRA files, samples before and after, the comparison grid, a state, logs and the report with concept scores."""
    from tools import concept_report

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    train, report = main_job()
    assert train[:2] == ["python3", "train_network.py"] and report[:2] == ["python3", "tools/concept_report.py"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_network.py"),
            *train[2:],
            "--max_train_steps",
            "4",
            "--sample_every_n_steps",
            "4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "output" / "tiny_lora"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["logs", "sample", "tiny_lora-state", "tiny_lora.safetensors", "tiny_lora_report.txt"]
    weights, metadata = load_safetensors(out / "tiny_lora.safetensors")
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_max_train_steps"] == "4" and metadata["ss_seed"] == "42"
    assert any(k.startswith("lora_unet_") for k in weights) and any(k.startswith("lora_te_") for k in weights)
    prompts = [line for line in (REPO / "examples" / "concept_prompts.txt").read_text().splitlines()]
    prompts = [line for line in prompts if line.strip() and not line.startswith("#")]
    samples = sorted(p.name for p in (out / "sample").glob("tiny_lora_*.png") if p.name != "tiny_lora_grid.png")
    assert len(samples) == 2 * len(prompts), samples
    manifest = json.loads((out / "sample" / "tiny_lora_grid.json").read_text())
    assert manifest["steps"] == [0, 4] and len(manifest["rows"]) == len(prompts)
    assert list((out / "logs").glob("**/events.out.tfevents.*"))
    lines = (out / "tiny_lora_report.txt").read_text().splitlines()
    assert lines[0].startswith("trained 4 steps in 1 epoch(s) in ") and lines[1].startswith("loss: ")
    assert lines[2:] == [
        f"{name + ':':9}{Path('output/tiny_lora') / path}"
        for name, path in (
            ("model", "tiny_lora.safetensors"),
            ("state", "tiny_lora-state"),
            ("samples", "sample"),
            ("grid", "sample/tiny_lora_grid.png"),
            ("logs", "logs"),
            ("report", "tiny_lora_report.txt"),
        )
    ]
    assert "grid:    output/tiny_lora/sample/tiny_lora_grid.png" in done.stderr + done.stdout
    with contextlib.chdir(tmp_path):
        concept_report.main(report[2:])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("concept (orange hollow circle, 'sks'): ") and "at step 4" in printed[0]
    assert printed[1].startswith("control prompts: judged right in ")
    assert (out / "tiny_lora_report.txt").read_text().splitlines() == [*lines, *printed[:2]]
