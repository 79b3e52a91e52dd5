"""sd-scripts' ``gen_img.py``: images from an SD 1.x/2.x model with LoRA-family networks, from one prompt or a prompt
file, and X/Y grids over a LoRA's weights (``--xy_lora_weights``, x axis) or its epoch files (``--xy_lora_files``, x
axis; y axis when weights are given too) against the prompts (y axis). See docs/tools/gen_img.md."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import apply_logging_flags, run_cli
from library.generate import generate, refuse_unsupported, settings_from_args, setup_parser


def main(argv: Sequence[str]) -> None:
    refuse_unsupported(argv)
    args = setup_parser(__doc__).parse_args(list(argv))
    apply_logging_flags(args)
    generate(settings_from_args(args))


if __name__ == "__main__":
    sys.exit(run_cli(main))
