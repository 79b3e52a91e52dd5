"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM end training after the current optimizer step."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from library.io import remove_stale_temporaries

logger = logging.getLogger("sdtrain")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status for a process ended by ``signum``: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after an optimizer step; exits with ``code`` (128 + the signal number).

    ``message`` says at which step and where the state went (or that none was saved); ``train`` logs it once the
    progress bar is closed."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(exit_code(signum))
        self.signum = signum
        self.message = message


class StopSignals:
    """While entered, SIGINT and SIGTERM only ask training to stop (``signum`` records the first one); a second
    one stops at once (SIGINT as KeyboardInterrupt, SIGTERM as :class:`TrainingInterrupted`). The previous handlers
    come back on exit, also on exceptions. Outside the main thread (where handlers cannot be set) nothing changes.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that were there before (a handler set outside Python reads as None: default)."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # a forked data-loader worker: the training process decides when to stop; a SIGTERM aimed at the
            # worker itself ends it as it would have without these handlers
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        name = signal_name(signum)
        if self.signum is not None:
            self.restore()
            if signum == signal.SIGINT:
                logger.warning(f"{name} received again: stopping at once, without saving")
                raise KeyboardInterrupt
            raise TrainingInterrupted(signum, f"training stopped at once by a second {name}; nothing was saved")
        self.signum = signum
        logger.warning(f"{name} received: stopping after the current step (send it again to stop at once)")


def stop_message(signum: int, step: int, state: Path) -> str:
    """The one line a run stopped by ``signum`` after ``step`` steps ends with; ``state``: where its state went."""
    stopped = f"training stopped at step {step} by {signal_name(signum)}"
    return f"{stopped}; state saved to {state} (continue with --resume {state} or --resume latest)"


def remove_run_temporaries(output_dir: Path) -> None:
    """Remove what interrupted saves left in ``output_dir`` and its ``sample`` folder (one info line for each), and
    rename back a previous state folder an interrupted save left aside."""
    for folder in (output_dir, output_dir / "sample"):
        if folder.is_dir():
            for path in remove_stale_temporaries(folder):
                logger.info(f"removed {path}, left by an interrupted save")
