"""Tag images with a WD14 tagger (ONNX, through onnxruntime) and write one tag file per image, with sd-scripts'
flags and output.

    python finetune/tag_images_by_wd14_tagger.py train_data/ --batch_size 8 --thresh 0.35 --use_rating_tags

Existing tag files are kept: an image that already has one is skipped unless --overwrite, so a re-run after an
interruption continues where it stopped. --append_tags instead extends every existing file with the tags it lacks
(that is the point of the flag), which is why running it twice appends nothing the second time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.prep.common import add_common_arguments
from library.prep.tagger import DEFAULT_MODEL_DIR, DEFAULT_REPO_ID, TaggerSettings, frequency_lines, tag_images


def setup_parser() -> ArgumentParser:
    """sd-scripts' flags for the ONNX path, plus --overwrite and --device."""
    parser = ArgumentParser(prog="tag_images_by_wd14_tagger.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("train_data_dir", type=str, help="folder of images to tag")
    parser.add_argument("--repo_id", type=str, default=DEFAULT_REPO_ID, help="tagger id on the Hugging Face hub")
    parser.add_argument(
        "--model_dir",
        type=str,
        default=DEFAULT_MODEL_DIR,
        help="where taggers are kept: <model_dir>/<repo_id with / as _>/ (or <model_dir> itself) holding model.onnx "
        "and selected_tags.csv; downloaded there only when missing",
    )
    parser.add_argument("--force_download", action="store_true", help="download the tagger again even if present")
    parser.add_argument("--caption_extension", type=str, default=".txt", help="extension of the tag files")
    parser.add_argument("--caption_extention", type=str, default=None, help="old misspelling of --caption_extension")
    parser.add_argument("--thresh", type=float, default=0.35, help="confidence needed to add a tag")
    parser.add_argument("--general_threshold", type=float, default=None, help="for general tags (default --thresh)")
    parser.add_argument(
        "--character_threshold", type=float, default=None, help="for character tags (default --thresh; above 1: none)"
    )
    parser.add_argument("--remove_underscore", action="store_true", help="underscores to spaces (tags over 3 chars)")
    parser.add_argument("--undesired_tags", type=str, default="", help="tags never written, separated like captions")
    parser.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    parser.add_argument("--onnx", action="store_true", help="accepted for compatibility: ONNX is always used")
    parser.add_argument(
        "--append_tags",
        action="store_true",
        help="add the new tags to existing tag files (only those they lack, so re-runs add nothing) instead of "
        "skipping images that have one",
    )
    parser.add_argument("--use_rating_tags", action="store_true", help="put the most likely rating tag first")
    parser.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="put the rating tag last")
    parser.add_argument(
        "--character_tags_first",
        action="store_true",
        help="character tags before general ones (each moved to the front as found, as sd-scripts does)",
    )
    parser.add_argument(
        "--always_first_tags",
        type=str,
        default=None,
        help="tags moved to the front when present, e.g. `1girl,1boy`; each is moved in turn, so the last listed "
        "ends first (as sd-scripts)",
    )
    parser.add_argument("--caption_separator", type=str, default=", ", help="between tags; include any space")
    parser.add_argument(
        "--tag_replacement",
        type=str,
        default=None,
        help="rename tags: `source1,target1;source2,target2`; escape , and ; inside a tag as \\, and \\;",
    )
    parser.add_argument(
        "--character_tag_expand", action="store_true", help="`name_(series)` becomes `name<separator>series`"
    )
    parser.add_argument(
        "--output_path",
        type=str,
        default=None,
        help="write one metadata file (.json, or .jsonl: one line per image) instead of tag files; fine_tune.py "
        "reads it with --in_json",
    )
    add_common_arguments(parser)
    return parser


def parse_settings(argv: Sequence[str]) -> TaggerSettings:
    """Flags -> settings, the thresholds falling back on --thresh as in sd-scripts."""
    args = setup_parser().parse_args(argv)
    return settings_from_flags(
        TaggerSettings,
        args,
        caption_extension=args.caption_extention or args.caption_extension,
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
    )


def main(argv: Sequence[str]) -> None:
    """Tag the folder; with --frequency_tags print the tag counts afterwards."""
    settings = parse_settings(argv)
    _report, frequencies = tag_images(settings)
    if settings.frequency_tags:
        print("\n".join(frequency_lines(frequencies)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
