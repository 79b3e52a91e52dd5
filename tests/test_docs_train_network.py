"""The worked example of docs/train_network.md runs as written, and its resumed run ends where the first one did."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

import train_network
from library.io import load_safetensors
from tests.conftest import REPO


def run_bash_block(page: str, tmp_path: Path, monkeypatch) -> Path:
    """Run the one ``bash`` block of ``docs/<page>`` from the repository root, its /tmp/<demo> folder moved into
    tmp_path. Each ``python train_network.py …`` command runs in this process (``train_network.main`` with the
    command's words), which saves an interpreter start-up per command; anything else in the block is refused."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"docs/{page} should have exactly one runnable bash block"
    demo = re.search(r"/tmp/[\w-]+", blocks[0]).group(0)
    out = tmp_path / "demo"
    commands = blocks[0].replace(demo, str(out)).replace("\\\n", " ").strip().splitlines()
    monkeypatch.chdir(REPO)
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "train_network.py"], command
        train_network.main(words[2:])
    return out


def test_worked_example_runs_and_resumes_step_exactly(tmp_path, monkeypatch):
    out = run_bash_block("train_network.md", tmp_path, monkeypatch)
    run = out / "run"
    names = sorted(p.name for p in run.iterdir())
    assert names == [
        "frog-lora-state",
        "frog-lora-step00000002-state",
        "frog-lora-step00000002.safetensors",
        "frog-lora-step00000004-state",
        "frog-lora-step00000004.safetensors",
        "frog-lora.safetensors",
        "frog-lora_report.txt",
        "sample",
    ]
    samples = sorted(p.name for p in (run / "sample").iterdir())
    assert len(samples) == 2 and all(re.fullmatch(r"frog-lora_000004_0[01]_\d{14}(_\d+)?\.png", s) for s in samples)
    assert list((out / "logs").glob("*/**/events.out.tfevents.*"))
    first, metadata = load_safetensors(run / "frog-lora.safetensors")
    resumed, resumed_metadata = load_safetensors(out / "resumed" / "frog-lora.safetensors")
    assert first.keys() == resumed.keys()
    for key in first:
        assert torch.equal(first[key], resumed[key]), key
    assert metadata["ss_steps"] == resumed_metadata["ss_steps"] == "4"
    step2 = load_safetensors(run / "frog-lora-step00000002.safetensors")[0]
    assert any(not torch.equal(step2[k], first[k]) for k in first)


def test_multi_gpu_accelerate_configs_load_in_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = (REPO / "docs" / "multi_gpu.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    kinds = []
    for n, block in enumerate(blocks):
        path = tmp_path / f"config{n}.yaml"
        path.write_text(block)
        config = load_config_from_file(str(path))
        kinds.append(str(config.distributed_type).rsplit(".", 1)[-1])
        assert config.num_processes == 2
    assert kinds == ["MULTI_GPU", "DEEPSPEED", "FSDP"]
