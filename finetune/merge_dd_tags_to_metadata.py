"""sd-scripts' ``finetune/merge_dd_tags_to_metadata.py``: put each image's tag file (from a tagger) into the
``tags`` field of a fine-tuning metadata JSON (existing entries and their other fields are kept)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import run_cli
from library.prep.metadata import merge_from_flags, merge_parser


def setup_parser() -> argparse.ArgumentParser:
    return merge_parser(__doc__, "tags", ".txt", misspelt_alias=False)


def main(argv: Sequence[str]) -> None:
    merge_from_flags(setup_parser().parse_args(argv), "tags")


if __name__ == "__main__":
    sys.exit(run_cli(main))
