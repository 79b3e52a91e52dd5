"""How entry scripts start and fail: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from library.config.settings import settings_from_flags
from library.errors import UserError

logger = logging.getLogger("sdtrain")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (with a did-you-mean for unknown flags) instead of the whole usage text."""

    def error(self, message: str):  # type: ignore[override]
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [o for action in self._actions for o in action.option_strings]
            words = unknown.group(1).split()
            flags_given = [w for w in words if w.startswith("-")]
            hints = []
            for word in flags_given or words:
                match = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
                if word.startswith("--") and match:
                    hints.append(f"{word} (did you mean {match[0]}?)")
                else:
                    hints.append(word)
            message = f"unknown argument(s): {', '.join(hints)}"
        raise UserError(f"{self.prog}: {message}; see --help")


def wants_debug(argv: Sequence[str]) -> bool:
    """Tracebacks are shown with ``--debug``, ``--console_log_level DEBUG`` or ``SDTRAIN_DEBUG=1``."""
    if "--debug" in argv or os.environ.get("SDTRAIN_DEBUG") == "1":
        return True
    for i, a in enumerate(argv):
        if a == "--console_log_level" and i + 1 < len(argv) and argv[i + 1].upper() == "DEBUG":
            return True
        if a.startswith("--console_log_level=") and a.split("=", 1)[1].upper() == "DEBUG":
            return True
    return False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record, so runs sharing a process (tests, notebooks) that
    replace stderr between them never write to a closed stream."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """StreamHandler assigns a stream in __init__ and setStream; the current sys.stderr is always used."""


def setup_logging(debug: bool = False) -> None:
    """Plain ``message`` lines on stderr for our logger; other libraries only show errors unless debugging."""
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if debug else "%(message)s"))
    root.setLevel(logging.WARNING)
    logger.setLevel(level)
    for noisy in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


@dataclass(frozen=True)
class LoggingSettings:
    """The console logging flags (``add_logging_arguments``); a parser without them gets the defaults."""

    debug: bool = False
    console_log_level: str | None = None
    console_log_file: str | None = None


def apply_logging_flags(args: argparse.Namespace) -> None:
    """Apply the parsed logging flags (see :func:`apply_logging`)."""
    apply_logging(settings_from_flags(LoggingSettings, args))


def apply_logging(settings: LoggingSettings) -> None:
    """``--console_log_level`` sets the lowest level shown; ``--console_log_file`` also writes the log to a file
    (overwritten, as sd-scripts does). ``--console_log_simple`` needs nothing: our log lines are always plain."""
    level = "DEBUG" if settings.debug else settings.console_log_level
    logger.setLevel(getattr(logging, level or "INFO"))
    close_log_files()
    path = settings.console_log_file
    if not path:
        return
    try:
        handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"--console_log_file {path}: cannot write it ({e.strerror or e}); check the folder") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._sdtrain_file = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)


def _log_files() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_sdtrain_file", False)]


def close_log_files() -> None:
    """Detach and close the --console_log_file handlers (run_cli does this when the script ends)."""
    for handler in _log_files():
        logging.getLogger().removeHandler(handler)
        handler.close()


MAX_ERROR_CHARS = 600


def error_line(error: UserError) -> str:
    """``error: <message>`` as exactly one line: line breaks shown as ``\\n`` and an over-long message (say, one
    echoing a whole table) cut, so a log reader always sees one line per error."""
    text = str(error).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return f"error: {text}"


def run_cli(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError becomes ``error: <message>`` on stderr (and in the --console_log_file) and
    exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(argv)
    setup_logging(debug)
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        line = error_line(e)
        print(line, file=sys.stderr)
        for handler in _log_files():
            handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, None, None))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (``| head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        close_log_files()
    return 0
