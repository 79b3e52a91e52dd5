"""The run's one seed and every value derived from it.

Each random choice (batch order, augmentation, captions, noise) draws from a generator seeded by
``derive_seed(seed, purpose, position...)``, so DataLoader workers, other processes and a resumed run make exactly
the same choices without sharing any RNG state.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose and position (e.g. "order", epoch), stable across processes and Python runs."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def step_generator(seed: int, *parts: object) -> torch.Generator:
    """A fresh CPU generator for one purpose and position, so a resumed run draws exactly the same numbers."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def resolve_seed(explicit: int | None, saved: Any = None) -> int:
    """The run's seed: ``--seed``, else the seed stored in the state being resumed, else a fresh random one."""
    if explicit is not None:
        return int(explicit)
    if saved is not None:
        return int(saved)
    return random.SystemRandom().randint(0, 2**31 - 1)


def choose_seed(explicit: int | None, resume: str | Path | None) -> int:
    """The run's one seed, chosen once at start-up: ``--seed``, else the seed of the state ``--resume`` names,
    else a fresh one (logged with the run summary and stored in every state)."""
    from library.state import read_train_state

    saved = read_train_state(resume).get("seed") if explicit is None and resume else None
    return resolve_seed(explicit, saved)
