"""How entry scripts start and fail: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

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


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    if not any(getattr(h, "_sdtrain", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if debug else "%(message)s"))
        handler._sdtrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel(level)
    for noisy in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


def run_cli(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(argv)
    setup_logging(debug)
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
