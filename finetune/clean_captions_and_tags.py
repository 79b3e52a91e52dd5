"""sd-scripts' ``finetune/clean_captions_and_tags.py``: tidy the ``tags`` and ``caption`` of every entry of a
fine-tuning metadata JSON (rules: docs/clean_captions_and_tags.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.prep.cleaning import CleanJob, clean_metadata_file

logger = logging.getLogger("sdtrain.prep")


def setup_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("in_json", type=str, help="metadata file to read")
    parser.add_argument("out_json", type=str, help="metadata file to write (may be in_json)")
    # sd-scripts' old three-argument form: train_data_dir in_json out_json
    parser.add_argument("legacy_out_json", type=str, nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="log each tag list and caption that changes")
    return parser


def parse(argv: Sequence[str]) -> CleanJob:
    """The job from the command line; the old three-argument form drops its first argument with a warning."""
    args = setup_parser().parse_args(argv)
    in_json, out_json = args.in_json, args.out_json
    if args.legacy_out_json is not None:
        logger.warning(
            "three arguments given: the first (train_data_dir) is no longer used; reading %s and writing %s",
            out_json,
            args.legacy_out_json,
        )
        in_json, out_json = out_json, args.legacy_out_json
    return CleanJob(Path(in_json), Path(out_json), args.debug)


def main(argv: Sequence[str]) -> None:
    clean_metadata_file(parse(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
