"""Every file of a state folder is loaded without running code: tampered, damaged and truncated files end a
``--resume`` with one line naming the file, and a clean state loads exactly as accelerate's ``load_state`` would."""

from __future__ import annotations

import io
import os
import pickle
import random
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_network
from library.cli import run_cli
from library.errors import UserError
from library.state import load_training_state, save_training_state
from tests.conftest import REPO
from tests.training import network_args, write_frog_dataset

REFUSAL = "it would run code"
TAMPERED = "the state folder may have been tampered with"


class OpenFile:
    """Unpickling this calls ``builtins.open(marker, 'w')``: the file appears if the pickle's code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class ShellCommand:
    """Unpickling this calls ``os.system('touch marker')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def raw_payload(kind: type, marker: Path, protocol: int) -> bytes:
    """A bare pickle of the payload with ``protocol``."""
    return pickle.dumps(kind(marker), protocol=protocol)


def torch_payload(kind: type, marker: Path, protocol: int) -> bytes:
    """The payload hidden in a ``torch.save`` archive beside real tensors, as a tampered accelerate file would be."""
    buffer = io.BytesIO()
    torch.save(
        {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [kind(marker)]}, buffer, pickle_protocol=protocol
    )
    return buffer.getvalue()


PAYLOADS = {
    "open-protocol2": (raw_payload, OpenFile, 2),
    "system-protocol4": (raw_payload, ShellCommand, 4),
    "open-protocol4-in-torch-archive": (torch_payload, OpenFile, 4),
    "system-protocol2-in-torch-archive": (torch_payload, ShellCommand, 2),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_the_payloads_do_run_when_unpickled_plainly(tmp_path, name):
    """Guards the test below: each payload really creates its marker under a plain ``pickle``/``torch`` load."""
    make, kind, protocol = PAYLOADS[name]
    marker = tmp_path / "ran"
    data = make(kind, marker, protocol)
    if make is raw_payload:
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


@pytest.fixture(scope="module")
def state(model_dir, data, tmp_path_factory) -> Path:
    """A real 2-step train_network.py state: model.safetensors, optimizer.bin, custom_checkpoint_0.pkl (cosine
    scheduler), random_states_0.pkl and train_state.json."""
    out = tmp_path_factory.mktemp("run")
    train_network.main(resume_args(model_dir, data, out))
    folder = out / "lora-state"
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "optimizer.bin",
        "custom_checkpoint_0.pkl",
        "random_states_0.pkl",
        "train_state.json",
    }
    return folder


def resume_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    run = ["--max_train_steps", "2", "--save_state", "--lr_scheduler", "cosine", *extra]
    return network_args(model_dir, data, out, *run)


def resume_error(model_dir: Path, data: Path, state: Path, out: Path, capsys) -> str:
    """Resume from ``state`` through train_network.py; return the one error line (the run must fail with code 2)."""
    code = run_cli(train_network.main, resume_args(model_dir, data, out, "--resume", str(state)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def copy_state(state: Path, where: Path) -> Path:
    folder = where / "lora-state"
    shutil.copytree(state, folder)
    return folder


# (file that gets the payload, file removed so the loader reads the payload's file instead)
TARGETS = {
    "custom_checkpoint_0.pkl": None,
    "optimizer.bin": None,
    "random_states_0.pkl": None,
    "pytorch_model.bin": "model.safetensors",  # accelerate's save_state(safe_serialization=False) layout
    "scheduler.bin": "custom_checkpoint_0.pkl",  # sd-scripts' layout: a prepared scheduler
}
CASES = [(target, payload) for target in TARGETS for payload in ("open-protocol2", "system-protocol4")]
CASES += [("custom_checkpoint_0.pkl", "open-protocol4-in-torch-archive")]
CASES += [("optimizer.bin", "system-protocol2-in-torch-archive")]


@pytest.mark.parametrize(("target", "payload"), CASES)
def test_resume_refuses_a_state_file_that_would_run_code(state, model_dir, data, tmp_path, capsys, target, payload):
    folder = copy_state(state, tmp_path)
    marker = tmp_path / "payload-ran"
    make, kind, protocol = PAYLOADS[payload]
    if TARGETS[target]:
        (folder / TARGETS[target]).unlink()
    (folder / target).write_bytes(make(kind, marker, protocol))
    line = resume_error(model_dir, data, folder, tmp_path / "out", capsys)
    assert not marker.exists()
    assert line.startswith(f"error: --resume refuses to load {folder / target}: {REFUSAL}")
    assert TAMPERED in line


def test_garbage_optimizer_is_a_one_line_error_naming_the_file(state, model_dir, data, tmp_path, capsys):
    folder = copy_state(state, tmp_path)
    (folder / "optimizer.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    line = resume_error(model_dir, data, folder, tmp_path / "out", capsys)
    assert line.startswith(f"error: --resume: {folder / 'optimizer.bin'} is damaged (")
    assert line.endswith("resume from another state folder")


def test_truncated_model_is_a_one_line_error_naming_the_file(state, model_dir, data, tmp_path, capsys):
    folder = copy_state(state, tmp_path)
    model = folder / "model.safetensors"
    with model.open("r+b") as f:
        f.truncate(model.stat().st_size // 2)
    line = resume_error(model_dir, data, folder, tmp_path / "out", capsys)
    assert line.startswith(f"error: --resume: {model} is damaged (")


def test_the_entry_script_prints_one_line_and_runs_nothing(state, model_dir, data, tmp_path, monkeypatch, capsys):
    """The reported case, as a user meets it: ``python train_network.py --resume`` with a tampered scheduler (the
    script's own ``__main__`` block, run in this process: tests/test_cli.py runs one entry script as a real program).
    """
    folder = copy_state(state, tmp_path)
    marker = tmp_path / "payload-ran"
    (folder / "custom_checkpoint_0.pkl").write_bytes(raw_payload(OpenFile, marker, 2))
    script = str(REPO / "train_network.py")
    monkeypatch.setattr(sys, "argv", [script, *resume_args(model_dir, data, tmp_path / "out", "--resume", str(folder))])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --resume refuses to load {folder / 'custom_checkpoint_0.pkl'}: {REFUSAL}")
    )
    assert not marker.exists()


# A small accelerate-prepared setup: the loader against accelerate's own load_state on the same folder.


def build(seed: int = 0):
    """A fresh Accelerator with a prepared model and AdamW, and a registered cosine-like scheduler."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return accelerator, model, optimizer, scheduler


def train_and_save(folder: Path) -> None:
    accelerator, model, optimizer, scheduler = build()
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        accelerator.step += 1
    random.random()
    save_training_state(accelerator, folder, {"current_step": 3})


def loaded(folder: Path, use_accelerate: bool) -> dict:
    """Everything a resume restores, after loading ``folder`` with accelerate or with our loader."""
    accelerator, model, optimizer, scheduler = build(seed=1)
    torch.manual_seed(123)
    if use_accelerate:
        accelerator.load_state(str(folder))
    else:
        load_training_state(accelerator, folder)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": accelerator.step,
        "python": random.random(),
        "numpy": np.random.random(),
        "torch": torch.rand(3),
    }


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_the_loader_restores_exactly_what_accelerate_load_state_restores(tmp_path):
    folder = tmp_path / "state"
    train_and_save(folder)
    ours, theirs = loaded(folder, use_accelerate=False), loaded(folder, use_accelerate=True)
    assert ours["step"] == 3 and ours["scheduler"]["last_epoch"] == 3
    assert_same(ours, theirs)


def test_an_sd_scripts_state_with_scheduler_bin_loads_its_scheduler(tmp_path):
    folder = tmp_path / "state"
    train_and_save(folder)
    expected = loaded(folder, use_accelerate=True)
    (folder / "custom_checkpoint_0.pkl").rename(folder / "scheduler.bin")
    assert_same(loaded(folder, use_accelerate=False), expected)


def test_a_missing_state_file_is_a_one_line_error(tmp_path):
    folder = tmp_path / "state"
    train_and_save(folder)
    (folder / "optimizer.bin").unlink()
    with pytest.raises(UserError, match=r"optimizer\.bin is missing, so the state folder is incomplete"):
        load_training_state(build()[0], folder)


def test_a_grad_scaler_state_loads_and_a_tampered_scaler_pt_is_refused(tmp_path):
    """fp16 runs on a GPU keep accelerate's GradScaler in scaler.pt; a CPU GradScaler exercises the same file."""
    accelerator = build()[0]
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    accelerator.scaler.scale(torch.ones(1))
    accelerator.scaler.update(new_scale=128.0)
    folder = tmp_path / "state"
    save_training_state(accelerator, folder, {"current_step": 0})
    assert (folder / "scaler.pt").is_file()
    fresh = build()[0]
    fresh.scaler = torch.amp.GradScaler("cpu")
    load_training_state(fresh, folder)
    assert fresh.scaler.get_scale() == 128.0
    marker = tmp_path / "payload-ran"
    (folder / "scaler.pt").write_bytes(raw_payload(OpenFile, marker, 2))
    with pytest.raises(UserError, match=rf"refuses to load {folder / 'scaler.pt'}: it would run code"):
        load_training_state(fresh, folder)
    assert not marker.exists()
