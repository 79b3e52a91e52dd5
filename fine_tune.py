"""sd-scripts' `fine_tune.py`: full fine-tuning from metadata.

Not implemented yet: it arrives with the DreamBooth / fine-tune / textual inversion work.
"""

import sys

from library.cli import run_cli
from library.errors import UserError


def main(argv: list[str]) -> None:
    raise UserError(
        "fine_tune.py (full fine-tuning from metadata) is not implemented yet in this toolkit; "
        "use train_network.py for LoRA training"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
