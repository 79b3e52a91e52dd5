"""sd-scripts' ``train_textual_inversion_XTI.py``: XTI (P+), one token embedding per UNet cross-attention layer.

SD 1.x only. Takes the flags of ``train_textual_inversion.py``; saves one ``(vectors, width)`` tensor per layer
(``IN01`` … ``OUT11``), as sd-scripts does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import train_textual_inversion
from library.cli import run_cli


def main(argv: Sequence[str]) -> None:
    train_textual_inversion.main(argv, xti=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
