"""Show the metadata of a safetensors file (LoRA, checkpoint, embedding), as sd-scripts' tools/show_metadata.py:
the ``ss_*`` training keys, ``sshs_*`` hashes and ``modelspec.*``, grouped, sorted and pretty-printed; ``--json``
prints one JSON object for scripts. Only the file's header is read (never the tensors), and pickle checkpoints
(``.ckpt``) are refused rather than unpickled.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.inspect.header import read_header
from library.inspect.metadata_view import metadata_lines, parsed_metadata

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class ShowMetadataSettings:
    """The flags: the file (positional or sd-scripts' ``--model``), ``--full`` and ``--json``."""

    model: str
    full: bool = False
    json: bool = False


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("file", nargs="?", default=None, help="the .safetensors file (or give it with --model)")
    parser.add_argument("--model", type=str, default=None, help="the .safetensors file (sd-scripts' flag)")
    parser.add_argument("--full", action="store_true", help="print long values (tag frequency, thumbnails) in full")
    parser.add_argument("--json", action="store_true", help="print one JSON object (JSON values parsed) instead")
    return parser


def parse(argv: Sequence[str]) -> ShowMetadataSettings:
    """Flags -> settings; exactly one of the positional file and ``--model``."""
    args = setup_parser().parse_args(argv)
    if (args.file is None) == (args.model is None):
        raise UserError("show_metadata.py: give the file once, as the positional argument or with --model")
    return settings_from_flags(ShowMetadataSettings, args, model=args.file or args.model)


def main(argv: Sequence[str]) -> None:
    settings = parse(argv)
    header = read_header(settings.model, "show_metadata.py")
    if not header.complete:
        logger.warning(
            f"{header.path}: the tensor data is cut short ({header.file_size} bytes, the header promises "
            f"{8 + header.header_bytes + header.data_bytes}); the metadata below is intact, the weights are not"
        )
    if settings.json:
        print(json.dumps(parsed_metadata(header.metadata), indent=2, ensure_ascii=False))
        return
    if not header.metadata:
        print(f"{header.path}: no metadata ({len(header.tensors)} tensor(s))")
        return
    print(f"{header.path}: {len(header.metadata)} metadata key(s), {len(header.tensors)} tensor(s)")
    for line in metadata_lines(header.metadata, full=settings.full):
        print(line)


if __name__ == "__main__":
    sys.exit(run_cli(main))
