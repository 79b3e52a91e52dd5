"""Score a run's samples for the example concept (``library/shapes/concept.py``: an orange ring, ``sks``): how
many trigger-prompt samples show it before and after training, and how much the control prompts changed. Reads
the run's sample grid manifest, prints the lines and adds them to the run's report."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.errors import UserError
from library.io import atomic_write_text
from library.shapes.concept import RING, concept_report


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path, help="the run's --output_dir (e.g. output/tiny_lora)")
    parser.add_argument("--output_name", default=None, help="the run's --output_name (default: the only grid there)")
    return parser


def find_manifest(output_dir: Path, output_name: str | None) -> Path:
    pattern = f"{output_name}_grid.json" if output_name else "*_grid.json"
    found = sorted((output_dir / "sample").glob(pattern))
    if len(found) != 1:
        what = "no sample grid" if not found else f"{len(found)} sample grids (pass --output_name)"
        raise UserError(
            f"{output_dir / 'sample'}: {what}; train with --sample_prompts and --sample_at_first so the run "
            "samples before and after training"
        )
    return found[0]


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(list(argv))
    manifest_path = find_manifest(args.output_dir, args.output_name)
    lines = concept_report(json.loads(manifest_path.read_text(encoding="utf-8")), RING)
    if not lines:
        raise UserError(f"{manifest_path}: no trigger ('{RING.trigger}') or control prompts to score")
    report = args.output_dir / manifest_path.name.replace("_grid.json", "_report.txt")
    kept = report.read_text(encoding="utf-8").splitlines() if report.is_file() else []
    kept = [line for line in kept if not line.startswith(("concept (", "control prompts:"))]
    atomic_write_text(report, "\n".join([*kept, *lines]) + "\n")
    for line in lines:
        print(line)
    print(f"report: {report}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
