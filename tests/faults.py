"""Fault injection helpers for tests/test_fault_injection.py: killing a training subprocess at a chosen moment, a
small tmpfs, random damage to a file, and checks that an output folder holds only complete files under final
names."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from library.errors import UserError
from library.io import load_safetensors
from library.state import read_train_state

# the files a train_network.py state folder holds (AdamW, a registered LR scheduler, one process)
STATE_FILES = frozenset(
    {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", "train_state.json"}
)

# how library/io.py names the temporaries of atomic writes: .<name>.<pid>-<origin>-<random>[<ext>].tmp
TEMPORARY = re.compile(r"^\..+\.[1-9][0-9]*-[0-9a-f]{8}-[0-9a-f]{8}(\.[A-Za-z0-9]{1,16})?\.tmp$")

CORRUPTIONS = ("truncate", "flip", "random", "delete", "empty", "directory", "payload")


def temporaries(folder: Path) -> list[str]:
    """Names of the atomic-write temporaries directly in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if TEMPORARY.match(p.name)) if folder.is_dir() else []


def incomplete_outputs(folder: Path) -> list[str]:
    """What is wrong with the files under final names in ``folder``: each ``*.safetensors`` must load completely
    and each ``*-state`` folder must be complete (see ``state_problem``). Empty when all is fine."""
    problems = []
    for path in sorted(folder.iterdir()):
        if TEMPORARY.match(path.name):
            continue
        if path.name.endswith(".safetensors"):
            try:
                load_safetensors(path)
            except UserError as e:
                problems.append(f"{path.name}: {e}")
        elif path.name.endswith("-state"):
            problem = state_problem(path)
            if problem:
                problems.append(f"{path.name}: {problem}")
    return problems


def state_problem(folder: Path) -> str | None:
    """Why the state folder ``folder`` is incomplete (every state file, a readable ``train_state.json``, a loadable
    ``model.safetensors``), or None when it is complete."""
    names = {p.name for p in folder.iterdir()}
    if names != STATE_FILES:
        return f"holds {sorted(names)}, not {sorted(STATE_FILES)}"
    try:
        read_train_state(folder)
        load_safetensors(folder / "model.safetensors")
    except UserError as e:
        return str(e)
    return None


def state_step(folder: Path) -> int:
    """The step a complete state folder was saved at."""
    return int(read_train_state(folder)["current_step"])


@dataclass
class Kill:
    """One SIGKILL of a training subprocess: how it was chosen, and what the output folder held right after."""

    description: str
    returncode: int
    listing: list[str]
    stderr: str


def kill_during(
    command: list[str], env: dict[str, str], out: Path, log: Path, *, after: int, state_temporaries: bool, delay: float
) -> Kill:
    """Run ``command`` and SIGKILL it ``delay`` seconds after the ``after``-th entry appears in ``out`` (counting
    only state-folder temporaries when ``state_temporaries``, else every name seen); give up waiting after 240 s.
    ``out`` is polled every 0.5 ms, so short-lived temporaries may go unseen: the kill then comes later."""
    what = "state temporary" if state_temporaries else "output entry"
    description = f"{delay * 1000:.1f} ms after {what} #{after}"
    with log.open("wb") as err:
        process = subprocess.Popen(command, cwd=Path(__file__).parent.parent, env=env, stdout=err, stderr=err)
        seen: set[str] = set()
        deadline = time.monotonic() + 240
        try:
            while process.poll() is None and time.monotonic() < deadline and len(seen) < after:
                names = os.listdir(out) if out.is_dir() else []
                seen.update(n for n in names if not state_temporaries or (TEMPORARY.match(n) and "-state." in n))
                time.sleep(0.0005)
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            listing = sorted(os.listdir(out)) if out.is_dir() else []
        finally:
            process.kill()
            process.wait()
    return Kill(description, process.returncode, listing, log.read_text(errors="replace"))


@contextlib.contextmanager
def tmpfs(point: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` (rounded up to KiB) mounted on ``point``; the test is skipped where mounting is not
    permitted (it needs root or CAP_SYS_ADMIN)."""
    point.mkdir(parents=True)
    kib = -(-size_bytes // 1024)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


class WritesMarker:
    """Unpickling this calls ``builtins.open(marker, 'w')``: the marker appears if a loader runs the pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def corrupt(path: Path, kind: str, rng: random.Random, marker: Path) -> str:
    """Damage the file ``path`` in the way ``kind`` names (one of CORRUPTIONS), choosing offsets and bytes with
    ``rng``; return a description for failure messages."""
    data = path.read_bytes()
    if kind == "truncate":
        offset = rng.randrange(len(data))
        path.write_bytes(data[:offset])
        return f"truncated to {offset} of {len(data)} bytes"
    if kind == "flip":
        damaged = bytearray(data)
        offsets = sorted(rng.sample(range(len(data)), min(len(data), rng.randint(1, 8))))
        for offset in offsets:
            damaged[offset] ^= rng.randint(1, 255)
        path.write_bytes(bytes(damaged))
        return f"bytes flipped at {offsets}"
    if kind == "random":
        path.write_bytes(rng.randbytes(len(data)))
        return f"replaced by {len(data)} random bytes"
    if kind == "delete":
        path.unlink()
        return "deleted"
    if kind == "empty":
        path.write_bytes(b"")
        return "emptied"
    if kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(b"x")
        return "replaced by a folder"
    if kind == "payload":
        path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=rng.choice([2, 4])))
        return "replaced by a pickle that would write a marker file"
    raise ValueError(f"unknown corruption {kind!r}")


def copy_folder(source: Path, target: Path) -> Path:
    """Copy an output or state folder (temporaries included) to ``target``."""
    shutil.copytree(source, target, symlinks=True)
    return target
