"""Write ``<stem>-masklabel.png`` loss masks (for ``--masked_loss``) beside each image: from a text prompt with
CLIPSeg, or from the image's alpha channel. See library/prep/masks.py for the modes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli
from library.prep.common import add_common_arguments
from library.prep.masks import DEFAULT_MODEL, MODES, MaskSettings, make_masks, split_prompts


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="folder of images to mask")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="what to mask (train on), e.g. 'a face'; comma-separated or repeated for several (their union)",
    )
    parser.add_argument("--model", type=str, default=DEFAULT_MODEL, help="CLIPSeg model id or local folder")
    parser.add_argument("--alpha", action="store_true", help="take the mask from the alpha channel (no model)")
    parser.add_argument("--threshold", type=float, default=0.3, help="probability above which a pixel is masked")
    parser.add_argument("--smooth_pixels", type=int, default=5, help="blur radius at the model's resolution")
    parser.add_argument("--expand_pixels", type=int, default=10, help="grow the mask by this many image pixels")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="fill",
        help="fill: only images without a mask; replace: new masks (existing ones only with --overwrite); "
        "add: union with the existing mask; subtract: existing mask minus the new one",
    )
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(list(argv))
    settings = MaskSettings(
        train_data_dir=args.train_data_dir,
        prompts=split_prompts(args.prompt),
        model=args.model,
        alpha=args.alpha,
        threshold=args.threshold,
        smooth_pixels=args.smooth_pixels,
        expand_pixels=args.expand_pixels,
        mode=args.mode,
        recursive=args.recursive,
        overwrite=args.overwrite,
        device=args.device,
        batch_size=args.batch_size,
        max_data_loader_n_workers=args.max_data_loader_n_workers,
    )
    make_masks(settings)


if __name__ == "__main__":
    sys.exit(run_cli(main))
