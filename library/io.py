"""Atomic file writes and careful reads of safetensors / pickle checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``final``; rename it onto ``final`` only if the block succeeds.

    A crash or Ctrl-C inside the block leaves at most a ``.tmp`` file behind, never a half-written final file.
    ``suffix`` keeps the extension for writers that look at it (e.g. ``.png``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final`` and swap it into place when the block succeeds.

    An existing ``final`` folder is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            _rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Run ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write a safetensors file atomically (tensors are made contiguous; shared storage is copied)."""
    owners = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    clean = {
        k: v.detach().contiguous().clone() if owners[v.untyped_storage().data_ptr()] > 1 else v.detach().contiguous()
        for k, v in tensors.items()
    }
    atomic_save(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise a UserError naming ``path`` if it is not a complete safetensors file (missing, truncated, garbage)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or header_len > min(size - 8, 100_000_000):
            raise UserError(f"{path}: not a safetensors file, or truncated (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise UserError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + header_len + data_end}); "
            "download or copy it again"
        )


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, with one-line errors for bad files."""
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: cannot read safetensors file: {e}") from e
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_pickle_checkpoint(path: str | os.PathLike, allow_unsafe: bool = False) -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt``/``.bin`` pickle with ``weights_only=True``.

    A pickle that imports code (the way malicious checkpoints run it) is refused unless ``allow_unsafe``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        imports = pickle_imports(path)
        if imports is None:
            raise UserError(f"{path}: not a readable checkpoint (truncated, corrupt or not a pickle)") from e
        foreign = sorted(name for name in imports if not name.startswith(_SAFE_IMPORT_PREFIXES))
        if not foreign:
            raise UserError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from e
        if not allow_unsafe:
            raise UserError(
                f"{path}: this pickle checkpoint wants to run code while loading (it imports "
                f"{', '.join(foreign[:3])}), which a plain weights file never needs; refused. Convert it to "
                ".safetensors, or pass --allow_unsafe_pickle if you trust its source"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from e


_SAFE_IMPORT_PREFIXES = ("torch.", "torch ", "collections.", "collections ", "numpy", "_codecs.", "_codecs ")


def pickle_imports(path: Path) -> set[str] | None:
    """The ``module.name`` globals a pickle (plain, or inside torch's zip format) would import; None if unparsable."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(member)
        else:
            data = path.read_bytes()
        names: set[str] = set()
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.add(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:
        return None
