"""A safetensors file's header (tensor names, dtypes, shapes, ``__metadata__``) read from its first bytes only:
8-byte little-endian length, then that many bytes of JSON. The tensor data is never read, and pickles are refused."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER_BYTES = 100_000_000
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says: ``tensors`` maps each name to its ``dtype``, ``shape`` and ``data_offsets``;
    ``data_bytes`` is how many bytes of tensor data the header promises and ``file_size`` how many the file has."""

    path: Path
    header_bytes: int
    file_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return max((info["data_offsets"][1] for info in self.tensors.values()), default=0)

    @property
    def complete(self) -> bool:
        """Whether the file holds all the tensor data its header promises (a cut download does not)."""
        return 8 + self.header_bytes + self.data_bytes <= self.file_size


def _pickle_error(path: Path, tool: str, how: str) -> UserError:
    return UserError(
        f"{path}: a pickle checkpoint ({how}); {tool} reads only .safetensors files and never unpickles one to "
        "look inside. Convert it to .safetensors first"
    )


def _not_safetensors(path: Path, head: bytes, tool: str, why: str) -> UserError:
    """The error for a file whose header does not parse: a pickle or torch zip by its first bytes, else ``why``."""
    if head.startswith(_PICKLE_MAGIC):
        return _pickle_error(path, tool, "by its content")
    return UserError(f"{path}: not a safetensors file ({why})")


def read_header(path: str | os.PathLike, tool: str) -> SafetensorsHeader:
    """The header of the safetensors file ``path``; one-line UserErrors for a missing file, a pickle, garbage or a
    header cut short. Only the header bytes are read; a pickle is refused by its extension, or by its first bytes
    once they are no safetensors header (a header length may start with the same bytes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        raise _pickle_error(path, tool, path.suffix)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length == 0 or length > MAX_HEADER_BYTES:
            raise _not_safetensors(path, head, tool, "its first 8 bytes are no header length")
        if length > size - 8 and head.startswith(_PICKLE_MAGIC):
            raise _pickle_error(path, tool, "by its content")
        if length > size - 8:
            raise UserError(
                f"{path}: truncated safetensors file (the header alone needs {length} bytes, the file has "
                f"{size - 8} after the length); download or copy it again"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _not_safetensors(path, head, tool, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: malformed safetensors header (__metadata__ must map names to strings)")
    for name, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise UserError(f"{path}: malformed safetensors header (entry {name!r} has no dtype/shape/data_offsets)")
    return SafetensorsHeader(path, length, size, dict(metadata), dict(header))
