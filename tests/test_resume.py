"""Step-exact resume through train_network.py: stopped (or killed) and resumed runs end bitwise identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_network
from library.cli import run_cli
from library.state import Position, position_from_step
from tests.conftest import REPO
from tests.test_train_network import assert_same_tensors, lora_tensors
from tests.training import network_args, write_frog_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


# 4 images, batch size 1: 4 batches per epoch, so step 2 is inside epoch 1 and step 6 inside epoch 2. Dropout makes
# the global torch RNG matter; cosine makes the scheduler state matter.
RUN = ["--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1"]
RUN += ["--lr_scheduler", "cosine"]


def args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return network_args(model_dir, data_dir, out, *RUN, *extra)


@pytest.fixture(scope="module")
def straight(model_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train_network.main(args(model_dir, data_dir, out))
    return out


def read_state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def test_stop_and_resume_twice_is_bitwise_identical_and_keeps_counting(straight, model_dir, data_dir, tmp_path):
    """The first resumed run loads batches in a worker process; the second resumes from a resumed run's state."""
    assert read_state(straight / "lora-state")["position"] == {"global_step": 6, "epoch": 1, "batches_done": 2}
    assert read_state(straight / "lora-step00000002-state")["position"] == {
        "global_step": 2,
        "epoch": 0,
        "batches_done": 2,
    }
    first = tmp_path / "first"
    state = str(straight / "lora-step00000002-state")
    train_network.main(args(model_dir, data_dir, first, "--resume", state, "--max_data_loader_n_workers", "1"))
    assert sorted(p.name for p in first.iterdir() if p.name.endswith("-state")) == [
        "lora-state",
        "lora-step00000004-state",
        "lora-step00000006-state",
    ]
    assert_same_tensors(lora_tensors(first / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))
    assert_same_tensors(
        lora_tensors(first / "lora-step00000004-state" / "model.safetensors"),
        lora_tensors(straight / "lora-step00000004-state" / "model.safetensors"),
    )
    second = tmp_path / "second"
    train_network.main(args(model_dir, data_dir, second, "--resume", str(first / "lora-step00000004-state")))
    state = read_state(second / "lora-step00000006-state")
    assert (state["current_step"], state["position"]["epoch"], state["position"]["batches_done"]) == (6, 1, 2)
    assert_same_tensors(lora_tensors(second / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))


def test_resume_after_sigkill_is_bitwise_identical(straight, model_dir, data_dir, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # same threads as this process, so the arithmetic is the same
    command = [sys.executable, str(REPO / "train_network.py"), *args(model_dir, data_dir, out)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "lora-step00000002-state"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the step-2 state never appeared"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "lora.safetensors").exists()
    assert all((p / "train_state.json").is_file() for p in out.iterdir() if p.name.endswith("-state"))
    resumed = tmp_path / "resumed"
    train_network.main(args(model_dir, data_dir, resumed, "--resume", str(state)))
    assert_same_tensors(lora_tensors(resumed / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))


def test_resume_with_another_network_or_dataset_is_refused(straight, model_dir, data_dir, tmp_path, capsys):
    state = str(straight / "lora-step00000002-state")
    code = run_cli(
        train_network.main, args(model_dir, data_dir, tmp_path / "a", "--resume", state, "--network_dim", "8")
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"error: --resume {state}: the network differs from the saved training state")
    assert "(network_dim: 4 in the state, 8 now)" in err
    more = write_frog_dataset(tmp_path / "more", count=5)
    code = run_cli(train_network.main, args(model_dir, more, tmp_path / "b", "--resume", state))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "the dataset differs from the saved training state (batches_per_epoch: 4 in the state, 5 now)" in err
    code = run_cli(train_network.main, args(model_dir, data_dir, tmp_path / "c", "--resume", state, "--seed", "4"))
    assert code == 2 and "the run differs from the saved training state (seed: 3 in the state, 4 now)" in (
        capsys.readouterr().err
    )
    code = run_cli(train_network.main, args(model_dir, data_dir, tmp_path / "d", "--resume", str(tmp_path / "none")))
    assert code == 2 and "no such state folder" in capsys.readouterr().err


def test_initial_step_override_skips_to_that_position(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    train_network.main(args(model_dir, data_dir, out, "--initial_step", "5", "--skip_until_initial_step"))
    assert sorted(p.name for p in out.iterdir()) == [
        "lora-state",
        "lora-step00000006-state",
        "lora-step00000006.safetensors",
        "lora.safetensors",
        "lora_report.txt",
    ]
    assert read_state(out / "lora-step00000006-state")["position"] == {
        "global_step": 6,
        "epoch": 1,
        "batches_done": 2,
    }


def test_position_from_step():
    assert position_from_step(5, 4, 1, skip_batches=True) == Position(5, 1, 1)
    assert position_from_step(5, 4, 1, skip_batches=False) == Position(5, 1, 0)
    assert position_from_step(3, 2, 3, skip_batches=True) == Position(3, 1, 3)


def test_seed_rule_is_flag_then_saved_state_then_fresh():
    from library.seeds import resolve_seed

    assert resolve_seed(5, 7) == 5
    assert resolve_seed(None, "7") == 7
    fresh = {resolve_seed(None) for _ in range(4)}
    assert all(0 <= s < 2**31 for s in fresh) and len(fresh) > 1


def test_resume_latest_picks_this_runs_newest_complete_state(straight, model_dir, data_dir, tmp_path, caplog):
    """--resume latest in the output folder: the state with the most steps of this --output_name; a state without
    train_state.json (unfinished) and another run's states are passed over. The result equals a straight run."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(straight / "lora-step00000002-state", out / "lora-step00000002-state")
    shutil.copytree(straight / "lora-step00000004-state", out / "other-step00000004-state")  # another run's
    (out / "lora-step00000005-state").mkdir()  # an unfinished save: no train_state.json
    with caplog.at_level("INFO", logger="sdtrain"):
        train_network.main(args(model_dir, data_dir, out, "--resume", "latest"))
    assert f"--resume latest: {out / 'lora-step00000002-state'}" in caplog.messages
    assert_same_tensors(lora_tensors(out / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))


def test_latest_state_rules(tmp_path):
    from library.state import STATE_FILE, latest_state

    def state(name: str, step: int, mtime: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / STATE_FILE).write_text(json.dumps({"current_step": step}))
        os.utime(folder / STATE_FILE, (mtime, mtime))
        return folder

    assert latest_state(tmp_path / "missing", "lora") is None
    assert latest_state(tmp_path, "lora") is None
    state("lora-000002-state", 20, 100.0)
    newest = state("lora-step00000020-state", 20, 200.0)  # as many steps, written later
    state("lora-step00000010-state", 10, 300.0)
    other = state("other-state", 99, 50.0)
    (tmp_path / "lora-damaged-state").mkdir()
    (tmp_path / "lora-damaged-state" / STATE_FILE).write_text("{")
    assert latest_state(tmp_path, "lora") == newest
    assert latest_state(tmp_path, None) == other


def test_backups_on_the_clock_keep_the_newest_and_resume_exactly(straight, model_dir, data_dir, tmp_path):
    """--backup_every_n_minutes (tiny here: a backup after every step) writes complete states that do not change the
    training; --backup_keep_last 2 leaves exactly the two newest; resuming from one equals the straight run.
    --sample_every_n_minutes samples after every step too."""
    out = tmp_path / "backups"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a frog --s 2 --w 64 --h 64\n")
    clock = ["--backup_every_n_minutes", "1e-9", "--backup_keep_last", "2"]
    clock += ["--sample_every_n_minutes", "1e-9", "--sample_prompts", str(prompts)]
    train_network.main(args(model_dir, data_dir, out, *clock))
    backups = sorted(p.name for p in out.iterdir() if "-backup-" in p.name)
    assert backups == ["lora-backup-step00000005-state", "lora-backup-step00000006-state"]
    assert read_state(out / backups[0])["position"] == {"global_step": 5, "epoch": 1, "batches_done": 1}
    assert len(list((out / "sample").glob("lora_0*.png"))) == 6 and (out / "sample" / "lora_grid.png").is_file()
    assert_same_tensors(lora_tensors(out / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))
    resumed = tmp_path / "resumed"
    train_network.main(args(model_dir, data_dir, resumed, "--resume", str(out / backups[0])))
    assert_same_tensors(lora_tensors(resumed / "lora.safetensors"), lora_tensors(straight / "lora.safetensors"))


def test_backup_keep_last_needs_backups(model_dir, data_dir, tmp_path, capsys):
    argv = args(model_dir, data_dir, tmp_path / "out", "--backup_keep_last", "2")
    assert run_cli(train_network.main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --backup_keep_last needs --backup_every_n_minutes (it keeps only the newest backups)"
    )
