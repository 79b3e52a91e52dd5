"""Saves on the clock (OneTrainer's "backup every N minutes" and "sample every N minutes"): when the next one is
due, and which backup states to remove so that only the last N stay.

Backups are complete training states named ``<output_name>-backup-step<step:08d>-state`` beside the other saves,
so ``--resume <folder>`` and ``--resume latest`` take them like any state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from library.saving import last_stem

BACKUP_MARK = "-backup-step"


@dataclass
class Every:
    """A wall-clock interval of ``minutes`` (None: never), counted from the start or the last :meth:`reset`."""

    minutes: float | None
    last: float = field(default_factory=time.monotonic)

    def due(self, now: float | None = None) -> bool:
        if self.minutes is None:
            return False
        return (time.monotonic() if now is None else now) - self.last >= self.minutes * 60

    def reset(self, now: float | None = None) -> None:
        self.last = time.monotonic() if now is None else now


def backup_state(output_dir: Path, output_name: str | None, step: int) -> Path:
    """The folder of the backup at ``step``."""
    return output_dir / f"{last_stem(output_name)}{BACKUP_MARK}{step:08d}-state"


def backups_to_remove(output_dir: Path, output_name: str | None, keep_last: int | None) -> list[Path]:
    """This run's backup states beyond the ``keep_last`` with the most steps (none when ``keep_last`` is None)."""
    if keep_last is None or not output_dir.is_dir():
        return []
    prefix = f"{last_stem(output_name)}{BACKUP_MARK}"
    found = []
    for folder in output_dir.iterdir():
        digits = folder.name[len(prefix) : -len("-state")]
        if folder.name.startswith(prefix) and folder.name.endswith("-state") and digits.isdigit():
            found.append((int(digits), folder))
    return [folder for _, folder in sorted(found)[: max(0, len(found) - keep_last)]]
