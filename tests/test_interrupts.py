"""SIGTERM and Ctrl-C stop training after the current step with a resumable state (with or without --save_state),
and a run removes what killed runs left behind."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_network
from library.engine.interrupts import StopSignals, TrainingInterrupted
from library.io import _ORIGIN
from tests.conftest import REPO
from tests.test_train_network import assert_same_tensors, lora_tensors
from tests.training import network_args, write_frog_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run while training")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.signum == signal.SIGTERM
            with pytest.raises(TrainingInterrupted) as stopped:
                os.kill(os.getpid(), signal.SIGTERM)
            assert stopped.value.code == 143
            assert signal.getsignal(signal.SIGTERM) is previous  # a second signal gives the handlers back at once
        assert signal.getsignal(signal.SIGTERM) is previous
        with pytest.raises(RuntimeError), StopSignals():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            raise RuntimeError("training failed")
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old)


def start_training(out: Path, argv: list[str], log: Path) -> subprocess.Popen:
    """``train_network.py argv`` in a subprocess, its stderr in ``log``; returns once its step-1 model is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # same threads as this process, so the arithmetic is the same
    with log.open("wb") as stderr:
        command = [sys.executable, str(REPO / "train_network.py"), *argv]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    first = out / "lora-step00000001.safetensors"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not first.exists():
        process.kill()
        process.wait()
        pytest.fail(f"the step-1 model never appeared: {log.read_text()[-2000:]}")
    return process


def stop(process: subprocess.Popen, signum: int) -> int:
    os.kill(process.pid, signum)
    try:
        return process.wait(timeout=120)
    finally:
        process.kill()


# a long run (constant learning rate), so the signal always comes before its end; dropout makes the RNG matter
LONG = ["--max_train_steps", "1000", "--save_every_n_steps", "1", "--network_dropout", "0.1"]


def test_sigterm_saves_a_state_that_resumes_bitwise(model_dir, data_dir, tmp_path):
    out, log = tmp_path / "stopped", tmp_path / "stderr.txt"
    process = start_training(out, network_args(model_dir, data_dir, out, *LONG), log)
    assert stop(process, signal.SIGTERM) == 143
    lines = log.read_text().strip().splitlines()
    assert "SIGTERM received: stopping after the current step (send it again to stop at once)" in lines
    found = re.fullmatch(
        r"training stopped at step (\d+) by SIGTERM; state saved to (.+) "
        r"\(continue with --resume (.+) or --resume latest\)",
        lines[-1],
    )
    assert found, lines[-1]
    step = int(found[1])
    state = out / f"lora-step{step:08d}-state"
    assert found[2] == found[3] == str(state)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("-state")) == [state.name]
    assert not (out / "lora.safetensors").exists()
    # a kill between the two renames of a state save leaves the previous folder aside: the run puts it back first
    aside = out / f".{state.name}.{dead_pid()}-{_ORIGIN}-0123abcd.old.tmp"
    state.rename(aside)
    total = ["--max_train_steps", str(step + 2), "--network_dropout", "0.1"]
    train_network.main(network_args(model_dir, data_dir, out, *total, "--resume", str(state)))
    assert state.is_dir() and not aside.exists()
    straight = tmp_path / "straight"
    train_network.main(network_args(model_dir, data_dir, straight, *total))
    assert_same_tensors(lora_tensors(out / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))


def test_ctrl_c_saves_a_state_that_resume_latest_picks(model_dir, data_dir, tmp_path, caplog):
    out, log = tmp_path / "stopped", tmp_path / "stderr.txt"
    process = start_training(out, network_args(model_dir, data_dir, out, *LONG), log)
    assert stop(process, signal.SIGINT) == 130
    last = log.read_text().strip().splitlines()[-1]
    found = re.fullmatch(r"training stopped at step (\d+) by SIGINT; state saved to (.+) \(continue with .+\)", last)
    assert found, last
    state = out / f"lora-step{int(found[1]):08d}-state"
    assert found[2] == str(state) and state.is_dir()
    assert [p.name for p in out.iterdir() if p.name.endswith("-state")] == [state.name]
    total = ["--max_train_steps", found[1], "--network_dropout", "0.1", "--resume", "latest"]
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        train_network.main(network_args(model_dir, data_dir, out, *total))
    assert f"--resume latest: {state}" in caplog.text
    assert f"resuming from {state} at step {found[1]}" in caplog.text


def test_a_run_removes_abandoned_temporaries_only(model_dir, data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    pid = dead_pid()
    abandoned = [
        out / f".lora.safetensors.{pid}-{_ORIGIN}-0123abcd.safetensors.tmp",
        out / f".lora-state.{pid}-{_ORIGIN}-89abcdef.tmp",
        out / "sample" / f".lora_000004_00.png.{pid}-{_ORIGIN}-00ff00ff.png.tmp",
    ]
    kept = [
        out / ".lora.safetensors.backup.tmp",
        out / f"lora.safetensors.{pid}-{_ORIGIN}-0123abcd.tmp",
        out / f".notes.txt.{os.getpid()}-{_ORIGIN}-0123abcd.txt.tmp",  # a live process's write in progress
    ]
    for path in abandoned + kept:
        if path.name.endswith("-89abcdef.tmp"):
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"partial")
        else:
            path.write_bytes(b"user data")
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        train_network.main(network_args(model_dir, data_dir, out, "--max_train_steps", "1"))
    assert [path for path in abandoned if path.exists()] == []
    assert all(path.read_bytes() == b"user data" for path in kept)
    removed = [r.getMessage() for r in caplog.records if r.getMessage().endswith("left by an interrupted save")]
    assert sorted(removed) == sorted(f"removed {path}, left by an interrupted save" for path in abandoned)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in kept), "lora.safetensors", "lora_report.txt", "sample"]
    )
