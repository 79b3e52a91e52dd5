"""Check a LoRA-family file's weights, as sd-scripts' networks/check_lora_weights.py: one line per weight tensor
(``key,(shape),mean |x|,min |x|``), then the modules whose update is zero (an all-zero factor: never trained) or
that hold NaN/inf, and a closing summary. Reads LoRA, LoCon, LoHa, LoKr, full, DoRA and OFT keys.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.inspect.weights import check_weights, tensor_line
from networks.lora import load_lora_state_dict

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class CheckWeightsSettings:
    """The flags: the file and ``-s/--show_all_keys`` (also list alpha and every other key)."""

    file: str
    show_all_keys: bool = False


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("file", type=str, help="LoRA-family file to check (.safetensors, or a weights-only .pt)")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list alpha and every other key")
    return parser


def main(argv: Sequence[str]) -> None:
    settings = settings_from_flags(CheckWeightsSettings, setup_parser().parse_args(argv))
    logger.info(f"loading: {settings.file}")
    sd = load_lora_state_dict(settings.file)
    report = check_weights(sd)
    if not report.modules:
        raise UserError(
            f"{settings.file}: no LoRA-family weights (lora_up/lora_down, hada_*, lokr_*, diff, oft_blocks) among its "
            f"{len(sd)} key(s); is it a LoRA file?"
        )
    print(f"number of LoRA modules: {len(report.modules)}, weight tensors: {len(report.network_keys)}")
    keys = report.network_keys
    if settings.show_all_keys:
        keys = keys + report.other_keys
        print(f"number of all keys: {len(keys)}")
    for key in keys:
        print(tensor_line(key, sd[key]))
    for module in report.untrained:
        print(f"untrained ({module.kind}: {module.zero_reason}): {module.name}")
    for module in report.non_finite:
        print(f"non-finite ({module.kind}: NaN/inf in {', '.join(module.non_finite)}): {module.name}")
    print(report.summary())


if __name__ == "__main__":
    sys.exit(run_cli(main))
