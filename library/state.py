"""Resumable training states: folders holding accelerate's ``save_state`` files plus ``train_state.json``.

``train_state.json`` keeps sd-scripts' ``current_epoch`` / ``current_step`` and adds what a step-exact resume
needs: the position inside the epoch (batches already trained), the seed, every global RNG state, and a
fingerprint of the trained network and of the dataset so a resume with changed settings is refused.

States are written by accelerate's ``save_state`` (the layout sd-scripts and earlier versions of this toolkit
share) but read back here, file by file, with ``torch.load(weights_only=True)`` or safetensors: nothing in a state
folder can run code, and a tampered, damaged or missing file is a one-line error naming it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import pickle
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.errors import UserError
from library.io import atomic_dir, atomic_write_json, pickle_imports

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

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


LATEST = "latest"


def latest_state(output_dir: Path, output_name: str | None) -> Path | None:
    """``--resume latest``: the complete state folder (``*-state`` holding ``train_state.json``) of this run's
    ``--output_name`` in ``output_dir`` with the most steps (the newest of equals), or None when there is none yet."""
    if not output_dir.is_dir():
        return None
    found: list[tuple[int, float, Path]] = []
    for folder in output_dir.iterdir():
        if not folder.name.endswith("-state") or not (folder / STATE_FILE).is_file():
            continue
        if output_name and not folder.name.startswith(f"{output_name}-"):
            continue
        try:
            step = int(json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["current_step"])
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("--resume latest: %s is damaged; not considered", folder)
            continue
        found.append((step, (folder / STATE_FILE).stat().st_mtime, folder))
    return max(found)[2] if found else None


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
def _shared_tmp_dir(accelerator: Accelerator, final: Path) -> Iterator[Path | None]:
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


def save_training_state(
    accelerator: Accelerator,
    final_dir: Path,
    record: dict[str, Any],
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write accelerate's state files, ``train_state.json`` and ``tensor_files`` (name: tensors, e.g. the EMA's
    ``ema.safetensors``) into ``final_dir`` atomically (all processes call)."""
    from safetensors.torch import save_file

    with _shared_tmp_dir(accelerator, final_dir) as tmp:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            for name, tensors in (tensor_files or {}).items():
                save_file(tensors, str(tmp / name))
            atomic_write_json(tmp / STATE_FILE, record)


def load_training_state(accelerator: Accelerator, state_dir: str | Path) -> None:
    """Load the weights, optimizer, scheduler, scaler, per-process RNG and registered objects of a state folder.

    Reads the files accelerate's ``save_state`` writes, in its order and onto its devices, so a resume gives what
    ``accelerator.load_state`` would, but every pickled file goes through ``torch.load(weights_only=True)`` (accelerate
    unpickles ``custom_checkpoint_N.pkl`` with ``weights_only=False``): a file that would run code is refused and
    nothing in it runs. A state from sd-scripts (its scheduler in ``scheduler.bin``) loads too.
    """
    from accelerate.utils import DistributedType

    folder = Path(state_dir)
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise UserError(
            f"--resume {folder}: resuming under {kind.value} is not supported (its checkpoint loader unpickles files "
            "in a way that can run code); resume in plain or DDP data-parallel mode"
        )
    if accelerator._dataloaders:
        raise ValueError("load_training_state: prepared dataloaders are not restored; the loop keeps the data position")
    map_location = _map_location(accelerator)
    models = list(accelerator._models)
    for hook in accelerator._load_model_state_pre_hook.values():
        hook(models, str(folder))
    for index, model in enumerate(models):
        _load_model(model, folder, "" if index == 0 else f"_{index}", map_location)
    for index, optimizer in enumerate(accelerator._optimizers):
        name = "optimizer.bin" if index == 0 else f"optimizer_{index}.bin"
        _apply(optimizer, folder / name, _load_pickled(folder / name, map_location))
    for index, scheduler in enumerate(accelerator._schedulers):
        name = "scheduler.bin" if index == 0 else f"scheduler_{index}.bin"
        _apply(scheduler, folder / name, _load_pickled(folder / name))
    if accelerator.scaler is not None:
        _apply(accelerator.scaler, folder / "scaler.pt", _load_pickled(folder / "scaler.pt"))
    _load_rng_file(accelerator, folder / f"random_states_{accelerator.process_index}.pkl")
    _load_custom_objects(accelerator, folder)


def _map_location(accelerator: Accelerator) -> Any:
    """Where accelerate's ``load_state`` puts optimizer states: the process's device when data-parallel on devices."""
    from accelerate.utils import DistributedType

    if (
        accelerator.num_processes > 1
        and accelerator.multi_device
        and accelerator.distributed_type != DistributedType.MULTI_XPU
    ):
        return accelerator.device
    return "cpu"


def _load_model(model: torch.nn.Module, folder: Path, suffix: str, map_location: Any) -> None:
    """``model{suffix}.safetensors`` (accelerate's default) or else ``pytorch_model{suffix}.bin``, loaded strictly."""
    from safetensors.torch import load_model

    path = folder / f"model{suffix}.safetensors"
    pickled = folder / f"pytorch_model{suffix}.bin"
    if path.exists() and not path.is_file():
        raise UserError(f"--resume: {path} is not a file, so the state folder is damaged; resume from another one")
    if not path.exists() and not pickled.exists():
        raise UserError(
            f"--resume: {path} (or {pickled.name}) is missing, so the state folder is incomplete; resume from "
            "another one"
        )
    if path.is_file():
        try:
            load_model(model, str(path), strict=True, device=str(map_location))
        except RuntimeError as e:
            raise UserError(
                f"--resume: {path} does not fit the network being trained ({_first_line(e)}); resume with the "
                "settings the state was trained with"
            ) from e
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise UserError(f"--resume: {path} is damaged ({_first_line(e)}); resume from another state folder") from e
        return
    _apply(model, pickled, _load_pickled(pickled, map_location))


def _apply(target: Any, path: Path, state: Any) -> None:
    """``target.load_state_dict(state)`` with a one-line error when the file's content does not fit."""
    try:
        target.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(
            f"--resume: {path} does not fit this training ({_first_line(e)}); resume with the settings the state "
            "was trained with, or from another state folder"
        ) from e


def _load_custom_objects(accelerator: Accelerator, folder: Path) -> None:
    """``custom_checkpoint_N.pkl`` for each object given to ``register_for_checkpointing`` (here the LR scheduler).

    sd-scripts prepares its scheduler instead of registering it, so its states hold ``scheduler.bin``: with no
    prepared scheduler, one registered object and no custom checkpoint, that file is the registered object's."""
    objects = list(accelerator._custom_objects)
    found = [p.name for p in folder.iterdir() if re.fullmatch(r"custom_checkpoint_\d+\.pkl", p.name)]
    sd_scripts = folder / "scheduler.bin"
    if not found and len(objects) == 1 and not accelerator._schedulers and sd_scripts.is_file():
        _apply(objects[0], sd_scripts, _load_pickled(sd_scripts))
        return
    missing = [i for i in range(len(objects)) if not (folder / f"custom_checkpoint_{i}.pkl").exists()]
    if missing and len(found) < len(objects):
        raise UserError(
            f"--resume: {folder / f'custom_checkpoint_{missing[0]}.pkl'} is missing, so the state folder is "
            "incomplete; resume from another one"
        )
    if len(found) != len(objects):
        raise UserError(
            f"--resume {folder}: the state holds {len(found)} custom checkpoint file(s) but this training keeps "
            f"{len(objects)}; resume from a state written by the same script"
        )
    for index, obj in enumerate(objects):
        path = folder / f"custom_checkpoint_{index}.pkl"
        _apply(obj, path, _load_pickled(path, "cpu"))


# The device RNG states accelerate writes: (key in random_states_N.pkl, torch module that restores them).
_DEVICE_RNG = (
    ("torch_cuda_manual_seed", "cuda"),
    ("torch_xpu_manual_seed", "xpu"),
    ("torch_mlu_manual_seed", "mlu"),
    ("torch_sdaa_manual_seed", "sdaa"),
    ("torch_musa_manual_seed", "musa"),
    ("torch_hpu_manual_seed", "hpu"),
    ("torch_neuron_manual_seed", "neuron"),
)


def _load_rng_file(accelerator: Accelerator, path: Path) -> None:
    """This process's ``random_states_N.pkl``: step counter, python, numpy, torch and device RNG states.

    As with accelerate, a missing file (a state written by fewer processes) leaves the RNGs alone."""
    if not path.is_file():
        logger.warning(f"{path} is missing: this process's random generators are not restored")
        return
    states = _load_pickled(path)
    try:
        if "step" in states:
            accelerator.step = int(states["step"])
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        for key, name in _DEVICE_RNG:
            device = getattr(torch, name, None)
            if key in states and device is not None and device.is_available():
                device.set_rng_state_all(states[key])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise UserError(f"--resume: {path} is damaged ({_first_line(e)}); resume from another state folder") from e


def _numpy_globals() -> list[Any]:
    """The numpy types a pickled ``np.random.get_state()`` needs (names of numpy 1.x and 2.x); none of them runs
    code: they rebuild an array and its dtype."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    names: list[Any] = [
        np.ndarray,
        np.dtype,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names.append(dtypes.UInt32DType)
    return names


def _load_pickled(path: Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a state file, allowing the numpy RNG types; one-line errors naming
    the file when it is missing, damaged, or would run code."""
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing, so the state folder is incomplete; resume from another one")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it did not write
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for bad files; each becomes one line naming the file
        called = _code_globals(path)
        if called:
            raise UserError(
                f"--resume refuses to load {path}: it would run code (it calls {', '.join(called[:3])}); the state "
                "folder may have been tampered with, so resume only from a state folder you trust"
            ) from None
        detail = "not a pickle torch can read" if isinstance(e, pickle.UnpicklingError) else _first_line(e)
        raise UserError(f"--resume: {path} is damaged ({detail}); resume from another state folder") from e


def _code_globals(path: Path) -> list[str]:
    """The functions and classes a pickle file names that ``weights_only`` loading does not allow (so loading it
    fully would call them). Only complete pickles count, so garbage is not mistaken for code. Nothing is run."""
    allowed = _allowed_global_names()
    return [name for name in pickle_imports(path) or [] if name not in allowed]


def _allowed_global_names() -> set[str]:
    """``module.name`` of every global ``torch.load(weights_only=True)`` accepts here (torch's own and ours)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    names = set(_get_allowed_globals())
    for entry in _numpy_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        names.add(name or f"{obj.__module__}.{obj.__qualname__}")
    return names


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
