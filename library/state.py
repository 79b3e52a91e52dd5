"""Resumable training states: folders holding accelerate's ``save_state`` files plus ``train_state.json``.

``train_state.json`` keeps sd-scripts' ``current_epoch`` / ``current_step`` and adds what a step-exact resume
needs: the position inside the epoch (batches already trained), the seed, every global RNG state, and a
fingerprint of the trained network and of the dataset so a resume with changed settings is refused.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import UserError
from library.io import atomic_dir, atomic_write_json

STATE_FILE = "train_state.json"
FORMAT = "sdtrain-state-1"


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, the epoch in progress and its micro-batches already used.

    ``batches_done`` counts the micro-batches of ``epoch`` that this process has trained on (per process).
    """

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0


def position_from_step(global_step: int, steps_per_epoch: int, accumulation: int, skip_batches: bool) -> Position:
    """The position reached after ``global_step`` steps of a run that never stopped (for --initial_step)."""
    epoch, within = divmod(global_step, max(steps_per_epoch, 1))
    return Position(global_step=global_step, epoch=epoch, batches_done=within * accumulation if skip_batches else 0)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def capture_rng() -> dict[str, Any]:
    """Every global random state (python, numpy, torch CPU and CUDA) as JSON-friendly values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the global random states written by :func:`capture_rng`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(_unb64(s)), dtype=torch.uint8) for s in state["cuda"]])


def train_state_record(
    position: Position,
    *,
    seed: int,
    num_processes: int,
    fingerprint: dict[str, dict[str, Any]],
    rng: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``train_state.json``; ``current_epoch``/``current_step`` keep sd-scripts' meaning."""
    return {
        "format": FORMAT,
        "current_epoch": position.epoch + 1,
        "current_step": position.global_step,
        "position": asdict(position),
        "global_batches_done": position.batches_done * num_processes,
        "num_processes": num_processes,
        "seed": seed,
        "fingerprint": fingerprint,
        "rng": rng,
    }


def resolve_seed(explicit: int | None, saved: Any = None) -> int:
    """The run's seed: ``--seed``, else the seed stored in the state being resumed, else a fresh random one."""
    if explicit is not None:
        return int(explicit)
    if saved is not None:
        return int(saved)
    return random.SystemRandom().randint(0, 2**31 - 1)


def read_train_state(state_dir: str | Path) -> dict[str, Any]:
    """Read ``train_state.json`` of a state folder, with one-line errors for missing or damaged states."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"--resume {state_dir}: no such state folder; pass a '<name>-state' folder from --output_dir")
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume {state_dir}: {STATE_FILE} is missing, so this is not a complete training state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged training state ({e}); resume from another state folder") from e
    if not isinstance(data, dict) or "current_step" not in data:
        raise UserError(f"{path}: not a training state (no current_step); resume from another state folder")
    return data


def saved_position(data: dict[str, Any], num_processes: int, steps_per_epoch: int, accumulation: int) -> Position:
    """The position recorded in a state; an sd-scripts state (steps only) resumes at its step's epoch boundary."""
    if "position" not in data:
        return position_from_step(int(data["current_step"]), steps_per_epoch, accumulation, skip_batches=True)
    pos = data["position"]
    global_batches = int(data.get("global_batches_done", pos["batches_done"]))
    return Position(
        global_step=int(pos["global_step"]), epoch=int(pos["epoch"]), batches_done=global_batches // num_processes
    )


def check_fingerprint(data: dict[str, Any], current: dict[str, dict[str, Any]], state_dir: str | Path) -> None:
    """Refuse to resume when the network shape or the dataset differ from those the state was written with."""
    saved = data.get("fingerprint")
    if not saved:
        return
    for section, now in current.items():
        before = saved.get(section, {})
        for key in sorted(set(before) | set(now)):
            if key in before and key in now and before[key] != now[key]:
                raise UserError(
                    f"--resume {state_dir}: the {section} differs from the saved training state "
                    f"({key}: {_short(before[key])} in the state, {_short(now[key])} now); resume with the settings "
                    "the state was trained with, or start a new training without --resume"
                )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


@contextlib.contextmanager
def _shared_tmp_dir(accelerator, final: Path) -> Iterator[Path | None]:
    """A temporary folder beside ``final`` that every process writes into; the main process swaps it in."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            broadcast_object_list([str(tmp)])
            yield tmp
            accelerator.wait_for_everyone()
    else:
        box = [None]
        broadcast_object_list(box)
        yield Path(box[0])
        accelerator.wait_for_everyone()


def save_training_state(accelerator, final_dir: Path, record: dict[str, Any]) -> None:
    """Write accelerate's state files and ``train_state.json`` into ``final_dir`` atomically (all processes call)."""
    with _shared_tmp_dir(accelerator, final_dir) as tmp:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, record)


def load_training_state(accelerator, state_dir: str | Path) -> None:
    """Load weights, optimizer, scheduler and per-process RNG states saved by accelerate."""
    try:
        accelerator.load_state(str(state_dir))
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--resume {state_dir}: cannot load this training state ({first})") from e
