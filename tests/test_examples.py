"""README's first command runs as written, and every file in examples/ is used by a run a test makes.

The command runs in a subprocess from a scratch folder holding a copy of examples/, so its relative paths
(``output/tiny_lora``, ``examples/tiny_dataset.toml``) resolve the way they do for a user in the repository root.
"""

from __future__ import annotations

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
    files = {p.resolve() for p in (REPO / "examples").glob("*") if p.is_file()}
    assert files - used == set(), "files in examples/ that no tested run uses"
    main_command = readme_commands()[0].split("&&", 1)[1]
    assert {REPO / shlex.split(main_command)[-1]} <= used


def test_readme_main_job_runs_as_written(tmp_path):
    """``python3 train_network.py --config_file examples/tiny_lora.toml``: LoRA files, samples, a state, logs."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    words = shlex.split(readme_commands()[0].split("&&", 1)[1])
    assert words[:2] == ["python3", "train_network.py"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "train_network.py"), *words[2:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "output" / "tiny_lora"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["logs", "sample", "tiny_lora-000001.safetensors", "tiny_lora-state", "tiny_lora.safetensors"]
    weights, metadata = load_safetensors(out / "tiny_lora.safetensors")
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_num_epochs"] == "2" and metadata["ss_seed"] == "42"
    assert any(k.startswith("lora_unet_") for k in weights) and any(k.startswith("lora_te_") for k in weights)
    samples = sorted(p.name for p in (out / "sample").iterdir())
    prompts = [line for line in (REPO / "examples" / "sample_prompts.txt").read_text().splitlines()]
    prompts = [line for line in prompts if line.strip() and not line.startswith("#")]
    assert len(samples) == 2 * len(prompts), samples
    assert list((out / "logs").glob("**/events.out.tfevents.*"))
    assert str(out.relative_to(tmp_path)) in done.stderr + done.stdout
