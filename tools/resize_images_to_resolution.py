"""Shrink the images of a folder to at most each given resolution's pixel count (aspect ratio kept, never enlarged),
as sd-scripts' tool of the same name: ``<stem>+<WxH>.jpg`` in the destination folder. See library/prep/resize.py."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli
from library.prep.resize import DEFAULT_RESOLUTIONS, INTERPOLATIONS, ResizeSettings, resize_folder


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("src_img_folder", type=str, help="folder with the images")
    parser.add_argument("dst_img_folder", type=str, help="folder for the resized images (created if missing)")
    parser.add_argument(
        "--max_resolution",
        type=str,
        default=DEFAULT_RESOLUTIONS,
        help='largest size(s) by area, comma-separated: "512x512,384x384"; one output per resolution',
    )
    parser.add_argument("--divisible_by", type=int, default=1, help="crop each side to a multiple of this (centred)")
    parser.add_argument(
        "--interpolation",
        type=str,
        choices=list(INTERPOLATIONS),
        default=None,
        help="resampling filter (Pillow: area/box = BOX, cubic = BICUBIC, lanczos4 = LANCZOS, linear = BILINEAR, "
        "nearest = NEAREST); default area",
    )
    parser.add_argument("--save_as_png", action="store_true", help="save PNG instead of JPEG (quality 100)")
    parser.add_argument(
        "--copy_associated_files",
        action="store_true",
        help="also copy each image's same-name files (captions, …) as <stem>+<WxH>.<ext>",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    parser.add_argument(
        "--max_data_loader_n_workers", type=int, default=None, help="images resized at once, in threads (default 2)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and each file written")
    return parser


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(list(argv))
    resize_folder(
        ResizeSettings(
            src_img_folder=args.src_img_folder,
            dst_img_folder=args.dst_img_folder,
            max_resolution=args.max_resolution,
            divisible_by=args.divisible_by,
            interpolation=args.interpolation,
            save_as_png=args.save_as_png,
            copy_associated_files=args.copy_associated_files,
            overwrite=args.overwrite,
            max_data_loader_n_workers=args.max_data_loader_n_workers,
        )
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
