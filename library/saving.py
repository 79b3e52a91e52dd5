"""Names of saved models and states, when they are written, and which old ones are removed (sd-scripts rules).

Models: ``<name>-<epoch:06d>.<ext>``, ``<name>-step<step:08d>.<ext>``, ``<name>.<ext>``. States:
``<name>-<epoch:06d>-state``, ``<name>-step<step:08d>-state``, ``<name>-state``. Without ``--output_name`` the
names are ``epoch``, ``at`` and ``last`` as in sd-scripts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from library.errors import UserError
from library.io import remove_atomically

DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_NAME = "last"
NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, xfs, btrfs, NTFS, APFS)
# what an atomic write's temporary adds to a name: "." + name + ".<pid up to 10>-<8 hex>-<8 hex>" + ext + ".tmp"
TEMP_NAME_OVERHEAD = 1 + 1 + 10 + 1 + 8 + 1 + 8 + 4


def epoch_stem(output_name: str | None, epoch: int) -> str:
    return f"{output_name or DEFAULT_EPOCH_NAME}-{epoch:06d}"


def step_stem(output_name: str | None, step: int) -> str:
    return f"{output_name or DEFAULT_STEP_NAME}-step{step:08d}"


def last_stem(output_name: str | None) -> str:
    return output_name or DEFAULT_LAST_NAME


def check_output_location(output_dir: Path, output_name: str | None) -> None:
    """Refuse, before step 1, an output folder that cannot be made and names too long for the file system, so a
    run never trains to the end and then fails to save."""
    ancestor = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if ancestor == output_dir and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file, not a folder; choose a folder for the outputs")
    if ancestor is not None and not ancestor.is_dir():
        raise UserError(f"--output_dir {output_dir}: {ancestor} is not a folder, so nothing can be created under it")
    if ancestor is not None and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {output_dir}: {ancestor} is not writable; choose a folder you can write to")
    name = os.fsencode(output_name or "")
    extension = len(".safetensors")  # the longest name suffix a save uses ("-state" is shorter)
    longest = len(os.fsencode(step_stem(output_name, 0))) + 2 * extension + TEMP_NAME_OVERHEAD
    if longest > NAME_MAX:
        raise UserError(
            f"--output_name: {len(name)} bytes is too long for the saved files' names (with step number, extension "
            f"and temporary suffix); use at most {NAME_MAX - (longest - len(name))} bytes"
        )


def epoch_to_remove(epoch: int, every_n_epochs: int, keep_last_n: int | None) -> int | None:
    """The epoch whose file falls out of the kept window when ``epoch`` is saved (None: nothing to remove)."""
    if keep_last_n is None:
        return None
    old = epoch - every_n_epochs * keep_last_n
    return old if old > 0 else None


def step_to_remove(step: int, every_n_steps: int, keep_last_n_steps: int | None) -> int | None:
    """The step whose file falls out of the last ``keep_last_n_steps`` steps when ``step`` is saved.

    ``--save_last_n_steps`` counts steps, not files: with saves every 10 steps and 30 kept, saving step 50 removes
    step 10.
    """
    if keep_last_n_steps is None:
        return None
    old = step - keep_last_n_steps - 1
    old -= old % every_n_steps
    return old if old > 0 else None


@dataclass(frozen=True)
class SavePlan:
    """Where and when one training run writes models and states."""

    output_dir: Path
    output_name: str | None = None
    extension: str = ".safetensors"
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    n_epoch_ratio: int | None = None
    num_epochs: int | None = None

    def epoch_interval(self, num_epochs: int | None = None) -> int | None:
        """Epochs between epoch saves: sd-scripts' --save_n_epoch_ratio N saves every ``floor(epochs / N)`` epochs
        (at least 1), about N models over the run, and wins over --save_every_n_epochs."""
        epochs = num_epochs if num_epochs is not None else self.num_epochs
        if self.n_epoch_ratio and epochs is not None:
            return max(1, epochs // self.n_epoch_ratio)
        return self.every_n_epochs

    def for_epochs(self, num_epochs: int) -> SavePlan:
        """This plan for a run of ``num_epochs`` epochs, with --save_n_epoch_ratio turned into its interval."""
        return replace(self, num_epochs=num_epochs, every_n_epochs=self.epoch_interval(num_epochs))

    def saves_at_epoch_end(self, epoch_no: int, num_epochs: int) -> bool:
        """sd-scripts skips the epoch save of the final epoch: the final model is written under the last name.

        With --save_n_epoch_ratio, use the run's plan (``for_epochs``) so the files to remove are counted in the
        same interval."""
        every = self.epoch_interval(num_epochs)
        return bool(every) and epoch_no % every == 0 and epoch_no < num_epochs

    def saves_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def epoch_model(self, epoch_no: int) -> Path:
        return self.output_dir / (epoch_stem(self.output_name, epoch_no) + self.extension)

    def step_model(self, step: int) -> Path:
        return self.output_dir / (step_stem(self.output_name, step) + self.extension)

    def last_model(self) -> Path:
        return self.output_dir / (last_stem(self.output_name) + self.extension)

    def epoch_state(self, epoch_no: int) -> Path:
        return self.output_dir / (epoch_stem(self.output_name, epoch_no) + "-state")

    def step_state(self, step: int) -> Path:
        return self.output_dir / (step_stem(self.output_name, step) + "-state")

    def last_state(self) -> Path:
        return self.output_dir / (last_stem(self.output_name) + "-state")

    def stale_epoch_model(self, epoch_no: int) -> Path | None:
        old = epoch_to_remove(epoch_no, self.epoch_interval() or 1, self.last_n_epochs)
        return None if old is None else self.epoch_model(old)

    def stale_step_model(self, step: int) -> Path | None:
        old = step_to_remove(step, self.every_n_steps or 1, self.last_n_steps)
        return None if old is None else self.step_model(old)

    def stale_epoch_state(self, epoch_no: int) -> Path | None:
        keep = self.last_n_epochs_state or self.last_n_epochs
        old = epoch_to_remove(epoch_no, self.epoch_interval() or 1, keep)
        return None if old is None else self.epoch_state(old)

    def stale_step_state(self, step: int) -> Path | None:
        keep = self.last_n_steps_state or self.last_n_steps
        old = step_to_remove(step, self.every_n_steps or 1, keep)
        return None if old is None else self.step_state(old)


def remove_output(path: Path | None) -> bool:
    """Delete an old model file or state folder if it exists (never leaving a half-deleted one under its name);
    True when something was removed."""
    return path is not None and remove_atomically(path)
