"""Rerun the pinned golden-loss runs (``tests/test_golden_losses.py``) on the bundled tiny-shapes model and rewrite
``tests/data/golden_losses.json``. Run it on purpose only: after swapping the model or an intended change to the
training maths (docs/testing.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests package

from library.cli import ArgumentParser, run_cli  # noqa: E402
from library.io import atomic_write_json  # noqa: E402


def setup_parser() -> ArgumentParser:
    return ArgumentParser(description=__doc__)


def main(argv: Sequence[str]) -> None:
    setup_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from tests import test_golden_losses as golden

    torch.set_num_threads(1)  # the values the test sees: it runs with one torch thread
    losses = golden.measure()
    record = {"model": golden.MODEL, "model_sha256": golden.model_fingerprint(), "steps": golden.STEPS, "runs": losses}
    for name, values in losses.items():
        print(f"{name}: {', '.join(f'{v:.6f}' for v in values)}")
    atomic_write_json(golden.GOLDEN, record)
    print(f"wrote {golden.GOLDEN}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
