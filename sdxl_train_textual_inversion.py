"""sd-scripts' ``sdxl_train_textual_inversion.py``: learn a new token's embedding in both text encoders of a
frozen SDXL model.

Takes ``train_textual_inversion.py``'s flags plus ``--disable_mmap_load_safetensors``; saves one file (``.pt`` by
default, or ``--save_model_as safetensors``) with ``clip_l`` and ``clip_g`` tensors, the layout A1111 and ComfyUI read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import train_textual_inversion
from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.sdxl_flags import SDXL_FAMILIES, add_sdxl_arguments, check_sdxl_flags


def setup_parser() -> argparse.ArgumentParser:
    parser = train_textual_inversion.setup_parser(__doc__)
    add_sdxl_arguments(parser, text_encoder_caching=False)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is not None:
        check_sdxl_flags(args)
        train_textual_inversion.run(args, families=SDXL_FAMILIES)


if __name__ == "__main__":
    sys.exit(run_cli(main))
