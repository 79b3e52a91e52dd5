"""sd-scripts' ``finetune/merge_captions_to_metadata.py``: put each image's caption file into the ``caption`` field of
a fine-tuning metadata JSON (existing entries and their other fields are kept)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.prep.metadata import MergeJob, merge_side_files


def setup_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="folder of training images")
    parser.add_argument("out_json", type=str, help="metadata file to write")
    parser.add_argument(
        "--in_json", type=str, default=None, help="metadata file to read (default: out_json when it exists)"
    )
    parser.add_argument(
        "--caption_extention", type=str, default=None, help="old misspelt name of --caption_extension; still accepted"
    )
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of the caption files")
    parser.add_argument(
        "--full_path", action="store_true", help="key entries by the image path instead of the file stem"
    )
    parser.add_argument("--recursive", action="store_true", help="also read sub-folders (needs --full_path)")
    parser.add_argument("--debug", action="store_true", help="log each key and caption")
    return parser


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(argv)
    job = MergeJob(
        train_data_dir=Path(args.train_data_dir),
        out_json=Path(args.out_json),
        field="caption",
        extension=args.caption_extention if args.caption_extention is not None else args.caption_extension,
        in_json=Path(args.in_json) if args.in_json is not None else None,
        full_path=args.full_path,
        recursive=args.recursive,
        debug=args.debug,
    )
    merge_side_files(job)


if __name__ == "__main__":
    sys.exit(run_cli(main))
