"""sd-scripts' ``sdxl_train_network.py``: train a LoRA (or any ``--network_module``) on a frozen SDXL model.

Takes ``train_network.py``'s flags plus ``--cache_text_encoder_outputs[_to_disk]`` and
``--disable_mmap_load_safetensors``; LoRA keys are sd-scripts' SDXL names (``lora_unet_input_blocks_…``,
``lora_te1_…``, ``lora_te2_…``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import train_network
from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.sdxl_flags import SDXL_FAMILIES, add_sdxl_arguments, check_sdxl_flags


def setup_parser() -> argparse.ArgumentParser:
    parser = train_network.setup_parser(__doc__)
    add_sdxl_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is not None:
        check_sdxl_flags(args)
        train_network.train(args, families=SDXL_FAMILIES)


if __name__ == "__main__":
    sys.exit(run_cli(main))
