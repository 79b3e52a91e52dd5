"""sd-scripts' `train_db.py`: DreamBooth training (full weights).

Not implemented yet: it arrives with the DreamBooth / fine-tune / textual inversion work.
"""

import sys

from library.cli import run_cli
from library.errors import UserError


def main(argv: list[str]) -> None:
    raise UserError(
        "train_db.py (DreamBooth training (full weights)) is not implemented yet in this toolkit; "
        "use train_network.py for LoRA training"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
