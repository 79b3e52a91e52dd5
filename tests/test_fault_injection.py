"""Seeded fault injection on real train_network.py runs: SIGKILLs at random moments, full disks of random sizes and
random damage to state files. Every choice comes from ``SEED`` (set ``SDTRAIN_FAULT_SEED`` to explore others); each
failure message names the seed and the case, so a failure can be replayed.

The promises checked: a killed run leaves only complete files under final names and resumes bitwise exactly; a full
disk ends the run with one ``error:`` line and keeps earlier saves; a damaged state file either does not matter or
ends ``--resume`` with one line naming it, never a traceback and never running code."""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch

import train_network
from library.cli import run_cli
from library.io import load_safetensors
from tests.conftest import REPO
from tests.faults import (
    CORRUPTIONS,
    STATE_FILES,
    Kill,
    copy_folder,
    corrupt,
    incomplete_outputs,
    kill_during,
    state_problem,
    state_step,
    temporaries,
    tmpfs,
)
from tests.training import network_args, write_frog_dataset

SEED = int(os.environ.get("SDTRAIN_FAULT_SEED", "20261201"))
STEPS = 6
# a model file and a state folder after every step; dropout and cosine make every part of the state matter
RUN = ["--max_train_steps", str(STEPS), "--save_every_n_steps", "1", "--save_state"]
RUN += ["--network_dropout", "0.1", "--lr_scheduler", "cosine"]
KILLS = 3
RESUME_FROM = STEPS - 1  # resuming damaged states from the step before the last keeps each case to one step


def args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The command line of the run every test here makes (with ``extra`` flags)."""
    return network_args(model_dir, data, out, *RUN, *extra)


def replay(case: str) -> str:
    """The words every failure message starts with: how to get the same case again."""
    return f"[SDTRAIN_FAULT_SEED={SEED}, {case}]"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved LoRA or state model file."""
    return load_safetensors(path)[0]


def differing(a: Path, b: Path) -> list[str]:
    """Keys whose tensors differ between two safetensors files (all keys if the key sets differ)."""
    x, y = tensors(a), tensors(b)
    if x.keys() != y.keys():
        return sorted(set(x) ^ set(y))
    return [key for key in x if not torch.equal(x[key], y[key])]


def run_quietly(argv: list[str]) -> tuple[int, str]:
    """``run_cli(train_network.main, argv)`` in this process; (exit code, everything written to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(train_network.main, argv)
    return code, err.getvalue()


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines in captured stderr (progress bars end their lines with carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


@pytest.fixture(scope="module")
def baseline(model_dir, data, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one is compared with."""
    out = tmp_path_factory.mktemp("baseline")
    train_network.main(args(model_dir, data, out))
    assert {p.name for p in out.iterdir()} == {f"lora-step{s:08d}.safetensors" for s in range(1, STEPS + 1)} | {
        f"lora-step{s:08d}-state" for s in range(1, STEPS + 1)
    } | {"lora.safetensors", "lora-state", "lora_report.txt"}
    return out


# Kills ---------------------------------------------------------------------------------------------------------


@dataclass
class Killed:
    """A killed run: the case (for messages), its output folder, and the kill."""

    case: str
    out: Path
    kill: Kill


@dataclass
class Restarted:
    """A restarted killed run: its folder, the state it resumed from, exit code, stderr, temporaries it found."""

    case: str
    out: Path
    resumed_from: Path | None
    code: int
    err: str
    left_before: list[str]


@pytest.fixture(scope="module")
def killed(model_dir, data, tmp_path_factory) -> list[Killed]:
    """KILLS train_network.py subprocesses (run side by side), each SIGKILLed at a seeded moment: either just as the
    n-th state folder's temporary appears (the slowest write, so the kill lands inside it; always so for the first)
    or a few ms after the n-th name of any kind appears in the output folder. Each n leaves the last step unsaved."""
    rng = random.Random(f"{SEED}-kills")
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # same threads as this process, so the arithmetic is the same
    plans = []
    for index in range(KILLS):
        inside_a_save = index == 0 or rng.random() < 0.5
        after = rng.randint(1, STEPS - 1) if inside_a_save else rng.randint(1, 2 * (STEPS - 1))
        delay = rng.uniform(0, 0.01) if inside_a_save else rng.uniform(0, 0.02)
        out = root / f"kill{index}"
        command = [sys.executable, str(REPO / "train_network.py"), *args(model_dir, data, out)]
        log = root / f"kill{index}.log"
        kill = partial(kill_during, command, env, out, log, after=after, state_temporaries=inside_a_save, delay=delay)
        plans.append((out, kill))
    with ThreadPoolExecutor(KILLS) as pool:
        kills = list(pool.map(lambda plan: plan[1](), plans))
    return [Killed(f"kill {index}: {kill.description}", plans[index][0], kill) for index, kill in enumerate(kills)]


@pytest.fixture(scope="module")
def restarted(killed, model_dir, data, tmp_path_factory) -> list[Restarted]:
    """Each killed output folder (copied) restarted in place: resumed from its newest complete state, or trained
    from the start when none is complete, to the same number of steps."""
    root = tmp_path_factory.mktemp("restarted")
    runs = []
    for index, run in enumerate(killed):
        out = copy_folder(run.out, root / f"kill{index}") if run.out.is_dir() else root / f"kill{index}"
        states = [p for p in out.glob("lora-step*-state") if state_problem(p) is None]
        newest = max(states, key=state_step, default=None)
        left_before = temporaries(out)
        code, err = run_quietly(args(model_dir, data, out, *(["--resume", str(newest)] if newest else [])))
        runs.append(Restarted(run.case, out, newest, code, err, left_before))
    return runs


def test_a_killed_run_leaves_only_complete_files_under_final_names(killed):
    for run in killed:
        message = f"{replay(run.case)} listing at the kill: {run.kill.listing}\n{run.kill.stderr[-2000:]}"
        assert run.kill.returncode in (0, -9), message
        assert run.out.is_dir(), message
        assert incomplete_outputs(run.out) == [], message
    message = replay(f"kills {[(run.case, run.kill.listing) for run in killed]}")
    # the kills must really interrupt training, and at least one inside a save, or this test proves nothing
    assert all(run.kill.returncode == -9 for run in killed), message
    assert any(temporaries(run.out) for run in killed), message


def test_resuming_after_a_kill_is_bitwise_identical_to_an_uninterrupted_run(restarted, baseline):
    for run in restarted:
        message = f"{replay(run.case)} resumed from {run.resumed_from}"
        assert run.code == 0, f"{message}\n{run.err[-2000:]}"
        assert incomplete_outputs(run.out) == [], message
        models = sorted(p.name for p in run.out.glob("*.safetensors"))
        assert models == sorted(p.name for p in baseline.glob("*.safetensors")), message
        for name in models:
            assert differing(run.out / name, baseline / name) == [], f"{message}: {name} differs"


def test_a_restart_after_a_kill_removes_the_temporaries_it_left(restarted):
    assert any(run.left_before for run in restarted), replay("no kill left a temporary to remove")
    for run in restarted:
        assert temporaries(run.out) == [], f"{replay(run.case)} left at the kill: {run.left_before}"


# Full disk -----------------------------------------------------------------------------------------------------

# Where the disk fills up: a range of sizes (as multiples of the first step's model file and state folder) and the
# save expected to fail there (None: any later one). The size within each range is seeded.
DISK_RANGES = {
    "first model save": ((0.25, 0), (0.9, 0), "lora-step00000001.safetensors"),
    "first state save": ((1.1, 0), (1, 0.9), "lora-step00000001-state"),
    "a later save": ((1, 1.1), (3, 3), None),
}
_disk_rng = random.Random(f"{SEED}-disk")
DISK_CASES = [(name, round(_disk_rng.random(), 4)) for name in DISK_RANGES]


@pytest.mark.parametrize(("where", "fraction"), DISK_CASES)
def test_a_full_disk_ends_the_run_with_one_line_and_keeps_earlier_saves(
    where, fraction, baseline, model_dir, data, tmp_path
):
    """A tmpfs of a size ``fraction`` of the way through the range that makes ``where`` fail (sizes measured from
    the baseline run's files)."""
    model = (baseline / "lora-step00000001.safetensors").stat().st_size
    state = sum(p.stat().st_size for p in (baseline / "lora-step00000001-state").iterdir())
    (low_models, low_states), (high_models, high_states), expected = DISK_RANGES[where]
    low, high = low_models * model + low_states * state, high_models * model + high_states * state
    size = int(low + fraction * (high - low))
    case = replay(f"{where}: disk of {size} bytes (model {model}, state {state})")
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "out"
        code, err = run_quietly(args(model_dir, data, out))
        assert code == 2, f"{case}\n{err[-2000:]}"
        assert "Traceback" not in err, f"{case}\n{err[-4000:]}"
        lines = error_lines(err)
        assert len(lines) == 1 and "no space left on device" in lines[0], f"{case}\n{err[-2000:]}"
        failed = Path(lines[0].removeprefix("error: ").split(": ", 1)[0])
        assert failed.parent == out and not failed.exists(), f"{case} {lines[0]}"
        assert expected is None or failed.name == expected, f"{case} {lines[0]}"
        assert temporaries(out) == [], case
        assert incomplete_outputs(out) == [], case
        for path in out.iterdir():
            if path.suffix == ".safetensors":
                assert differing(path, baseline / path.name) == [], f"{case} {path.name} differs"


# Damaged state files -------------------------------------------------------------------------------------------

# Deleting a file, emptying it or putting a folder in its place: each state file, every time. Truncation, flipped
# bytes, random bytes and a code-running pickle at seeded offsets: RANDOM_DAMAGES cases, each kind equally often.
STRUCTURAL = ("delete", "empty", "directory")
RANDOM_DAMAGES = 8
_damage_rng = random.Random(f"{SEED}-damage")
_random_kinds = [kind for kind in CORRUPTIONS if kind not in STRUCTURAL]
DAMAGES = [(target, kind, 0) for target in sorted(STATE_FILES) for kind in STRUCTURAL]
DAMAGES += [
    (_damage_rng.choice(sorted(STATE_FILES)), _random_kinds[index % len(_random_kinds)], _damage_rng.randrange(2**32))
    for index in range(RANDOM_DAMAGES)
]


@pytest.mark.parametrize(
    ("index", "target", "kind", "seed"),
    [
        pytest.param(
            index,
            target,
            kind,
            seed,
            id=f"{index}-{target}-{kind}",
        )
        for index, (target, kind, seed) in enumerate(DAMAGES)
    ],
)
def test_a_damaged_state_file_is_harmless_or_one_line_naming_it(
    index, target, kind, seed, baseline, model_dir, data, tmp_path
):
    folder = copy_folder(baseline / f"lora-step{RESUME_FROM:08d}-state", tmp_path / "lora-state")
    path = folder / target
    marker = tmp_path / "payload-ran"
    how = corrupt(path, kind, random.Random(seed), marker)
    case = replay(f"damage {index}: {target} {how}")
    try:
        code, err = run_quietly(args(model_dir, data, tmp_path / "out", "--resume", str(folder)))
    except Exception as e:  # noqa: BLE001 - anything but a UserError escaping run_cli is the bug being looked for
        pytest.fail(f"{case}: the resume raised {type(e).__name__}: {e}")
    assert not marker.exists(), f"{case}: the state file's code ran"
    assert "Traceback" not in err, f"{case}\n{err[-4000:]}"
    if code == 0:
        assert differing(tmp_path / "out" / "lora.safetensors", baseline / "lora.safetensors") == [], (
            f"{case}: the resume went on with the damaged file and trained different weights"
        )
        return
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, f"{case} exit code {code}\n{err[-2000:]}"
    assert str(path) in lines[0] or (str(folder) in lines[0] and target in lines[0]), f"{case}: {lines[0]}"
