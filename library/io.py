"""Atomic file writes and careful reads of safetensors / pickle checkpoints."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickletools
import re
import secrets
import shutil
import socket
import struct
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError

logger = logging.getLogger("sdtrain.io")


TEMP_STALE_AFTER_S = 15 * 60
"""A temporary written from another host or container (whose writer's pid cannot be checked here) counts as
abandoned after this long without any write to it."""

_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<pid>[1-9][0-9]{0,9})-(?P<origin>[0-9a-f]{8})-[0-9a-f]{8}(?P<ext>\.[A-Za-z0-9]{1,16})?\.tmp$"
)
_EXT = re.compile(r"^(\.[A-Za-z0-9]{1,16})?$")
_OLD = ".old"

_REASONS = {
    errno.ENOSPC: ("no space left on device", "free space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and rerun"),
    errno.EROFS: ("read-only file system", "write to another folder (e.g. another --output_dir) and rerun"),
    errno.EACCES: ("permission denied", "make the folder writable or write to another one and rerun"),
    errno.EPERM: ("operation not permitted", "make the folder writable or write to another one and rerun"),
    errno.EFBIG: ("file too large for this file system", "write to another file system and rerun"),
    errno.EIO: ("input/output error", "check the disk and rerun"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter name (e.g. --output_name) and rerun"),
    errno.EISDIR: ("a folder is in the way", "remove or rename it and rerun"),
    errno.ENOTDIR: ("a file is in the way of a folder", "remove or rename it and rerun"),
    errno.EEXIST: ("a file is in the way of a folder", "remove or rename it and rerun"),
}
# what torch's and safetensors' writers say when the OS refuses a write (they do not pass the OSError on)
_WRITE_FAILURE_TEXT = (
    "iostream error",
    "PytorchStreamWriter failed",
    "file write failed",
    "unexpected pos",
    "I/O error",
)


class DiskWriteError(UserError, OSError):
    """Writing a file or folder failed in the OS (full disk, quota, read-only, …); a one-line UserError naming
    the final path. It is also an OSError (with ``errno`` and ``strerror``) for callers that treat a failed
    optional write as a warning."""

    def __init__(self, message: str, code: int | None, reason: str):
        super().__init__(message)
        self.errno = code
        self.strerror = reason

    def __str__(self) -> str:
        return str(self.args[0])


def _origin() -> str:
    """This host and pid namespace, so a pid in a temporary's name is only checked where it means something."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.blake2b(f"{socket.gethostname()}\0{namespace}".encode(), digest_size=4).hexdigest()


_ORIGIN = _origin()


def _temp_path(final: Path, ext: str) -> Path:
    """``.<name>.<pid>-<origin>-<random><ext>.tmp`` beside ``final`` (the pattern remove_stale_temporaries knows)."""
    if not _EXT.match(ext):
        raise ValueError(f"temporary file suffix must be like '.png', got {ext!r}")
    return final.with_name(f".{final.name}.{os.getpid()}-{_ORIGIN}-{secrets.token_hex(4)}{ext}.tmp")


def _write_failure(exc: BaseException, folder: Path) -> tuple[int | None, str] | None:
    """(errno or None, detail) when ``exc`` (or what caused it) is the OS refusing a write; None for other errors."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, OSError):
            detail = error.strerror or str(error) or type(error).__name__
            if error.filename and not isinstance(error, DiskWriteError):
                detail = f"{detail}: {error.filename}"
            return error.errno, detail
    text = " | ".join(str(error) for error in chain)
    found = re.search(r"os error (\d+)", text)
    if found:
        return int(found[1]), os.strerror(int(found[1]))
    if any(marker in text for marker in _WRITE_FAILURE_TEXT):
        try:
            stat = os.statvfs(folder)
            nearly_full = stat.f_bavail * stat.f_frsize < 1 << 20
        except OSError:
            nearly_full = False
        return (errno.ENOSPC if nearly_full else None), ""
    return None


def _error(final: Path, kind: str, existed: bool, code: int | None, detail: str) -> DiskWriteError:
    """The one-line error for a failed write of ``final`` (``detail``: the OS's words when ``code`` is unusual)."""
    if code in _REASONS:
        reason, advice = _REASONS[code]
        reason += " while writing"
    else:
        reason = f"cannot write ({detail})" if detail else "the file system refused a write"
        advice = "check free space, quota and permissions and rerun"
    before = f"the previous {kind} is intact" if existed else f"no partial {kind} was left"
    return DiskWriteError(f"{final}: {reason}; {before}; {advice}", code, reason)


def _make_temp(final: Path, kind: str, existed: bool, make: Callable[[Path], None], ext: str) -> Path:
    """Create the parent folder and a fresh temporary beside ``final`` with ``make``; OS errors become UserErrors."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = _temp_path(final, ext)
            try:
                make(tmp)
                return tmp
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no unused temporary name")
    except OSError as e:
        raise _error(final, kind, existed, e.errno, e.strerror or str(e)) from e


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is a set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes ``open``/``mkdir`` would: 0666/0777 & ~umask.

    Writers such as safetensors create their files 0600 whatever the umask; sd-scripts' outputs follow the umask.
    Best effort: file systems without Unix modes (FAT, some network mounts) refuse chmod, which is not an error.
    """
    mask = _umask()

    def chmod(target: str | Path, mode: int) -> None:
        with contextlib.suppress(OSError):
            os.chmod(target, mode & ~mask)

    if not path.is_dir() or path.is_symlink():
        chmod(path, 0o666)
        return
    chmod(path, 0o777)
    for root, dirs, files in os.walk(path):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                if not os.path.islink(os.path.join(root, name)):
                    chmod(os.path.join(root, name), mode)


def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))  # mode & ~umask


def _new_folder(tmp: Path) -> None:
    os.mkdir(tmp, 0o777)  # mode & ~umask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``final``; rename it onto ``final`` only if the block succeeds.

    A crash or Ctrl-C inside the block leaves at most a temporary behind (see ``remove_stale_temporaries``), never
    a half-written final file. The file gets mode ``0666 & ~umask``, like ``open(path, "w")``, whatever mode the
    writer created it with. An OS error while writing (full disk, quota, read-only file system, also as reported
    by torch and safetensors) becomes a one-line ``DiskWriteError`` naming ``final``; a folder in the way of
    ``final`` is one too. ``suffix`` keeps the extension for writers that look at it (e.g. ``.png``).
    """
    final = Path(final)
    if final.is_dir():
        raise DiskWriteError(
            f"{final}: a folder is where this file should be written; remove or rename it and rerun",
            errno.EISDIR,
            "a folder is in the way",
        )
    existed = final.exists()
    tmp = _make_temp(final, "file", existed, _new_file, suffix)
    try:
        yield tmp
        _follow_umask(tmp)
        os.replace(tmp, final)
    except Exception as e:
        failure = _write_failure(e, final.parent)
        if failure is None:
            raise
        raise _error(final, "file", existed, *failure) from e
    finally:
        _discard(tmp)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final`` and swap it into place when the block succeeds.

    An existing ``final`` folder is replaced only after the new one is complete. The folder and what is written in
    it get modes ``0777``/``0666 & ~umask``, like ``mkdir``/``open``. OS errors while filling it (whoever writes:
    torch, safetensors, accelerate) become a one-line ``DiskWriteError`` naming ``final``, as in ``atomic_path``.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise DiskWriteError(
            f"{final}: a file is where this folder should be written; remove or rename it and rerun",
            errno.ENOTDIR,
            "a file is in the way",
        )
    existed = final.exists()
    tmp = _make_temp(final, "folder", existed, _new_folder, "")
    try:
        yield tmp
        _follow_umask(tmp)
        if os.path.lexists(final):
            old = _temp_path(final, _OLD)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            _discard(old)
        else:
            os.replace(tmp, final)
    except Exception as e:
        failure = _write_failure(e, final.parent)
        if failure is None:
            raise
        raise _error(final, "folder", existed, *failure) from e
    finally:
        _discard(tmp)


def _discard(path: Path) -> None:
    """Remove a temporary file or folder if it is there; a failure is logged (remove_stale_temporaries retries)."""
    for _ in range(3):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
            return
        except FileNotFoundError:
            continue  # another process removed part of it at the same time: look again
        except OSError as e:
            logger.warning("%s: cannot remove this temporary (%s)", path, e.strerror or e)
            return


def remove_atomically(path: str | os.PathLike) -> bool:
    """Delete a file or folder so no half-deleted one is ever left under its name: it is first renamed to a
    temporary of our naming (which remove_stale_temporaries finishes off after a kill). True when it existed."""
    final = Path(path)
    if not os.path.lexists(final):
        return False
    tmp = _temp_path(final, "")
    os.replace(final, tmp)
    _discard(tmp)
    return True


def remove_stale_temporaries(folder: str | os.PathLike, stale_after_s: float = TEMP_STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries that interrupted atomic writes left in ``folder``; return the removed paths.

    Only entries named exactly as ``atomic_path``/``atomic_dir`` name them (``.<name>.<pid>-<origin>-<random>
    [<ext>].tmp``) are considered, and only abandoned ones: written on this host and pid namespace by a process
    that is no longer running, or written elsewhere and untouched for ``stale_after_s``. A complete previous
    folder that a kill between ``atomic_dir``'s two renames left as ``….old.tmp`` is renamed back when its final
    folder is missing, instead of being removed. Not recursive; unreadable folders are skipped with a warning.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    except OSError as e:
        logger.warning("%s: cannot list this folder to remove stale temporaries (%s)", folder, e.strerror or e)
        return []
    removed = []
    for entry in entries:
        found = _TEMP_NAME.match(entry.name)
        if not found or not _abandoned(Path(entry.path), int(found["pid"]), found["origin"], stale_after_s):
            continue
        path = Path(entry.path)
        final = folder / found["name"]
        if found["ext"] == _OLD and entry.is_dir(follow_symlinks=False) and not os.path.lexists(final):
            try:
                os.replace(path, final)
                logger.warning("%s: restored the previous folder that an interrupted save left as %s", final, path)
            except OSError as e:
                logger.warning("%s: cannot rename it back to %s (%s); rename it by hand", path, final, e)
            continue
        _discard(path)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _abandoned(path: Path, pid: int, origin: str, stale_after_s: float) -> bool:
    if origin == _ORIGIN:
        return not _pid_alive(pid)
    return time.time() - _last_change(path) > stale_after_s


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest mtime/ctime of ``path`` and everything under it (a live writer keeps touching its files)."""
    newest = 0.0
    for root, dirs, files in os.walk(path) if path.is_dir() and not path.is_symlink() else [(str(path), [], [])]:
        for name in [None, *dirs, *files]:
            try:
                st = os.lstat(root if name is None else os.path.join(root, name))
            except OSError:
                continue
            newest = max(newest, st.st_mtime, st.st_ctime)
    return newest


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


def pickle_imports(path: Path) -> list[str] | None:
    """The ``module.name`` globals the complete pickles of a file (plain, or the ``.pkl`` members of torch's zip
    format) would import, in order and without repeats; None when the file holds no complete pickle (garbage,
    truncated). Read with ``pickletools``: nothing is run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError):
        return None
    names: list[str] | None = None
    for blob in blobs:
        for found in _complete_pickle_globals(blob):
            names = [] if names is None else names
            names += [name for name in found if name not in names]
    return names


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _complete_pickle_globals(blob: bytes) -> list[list[str]]:
    """For each complete pickle of ``blob`` (several follow each other in torch's legacy format), the names given to
    GLOBAL / STACK_GLOBAL / INST, read with ``pickletools`` without running anything. STACK_GLOBAL takes its names
    from the strings pushed before it (directly or from the memo)."""
    stream, names = io.BytesIO(blob), []
    while stream.tell() < len(blob):
        found: list[str] = []
        strings: list[str] = []
        memo: dict[Any, str] = {}
        memo_count, last = 0, None
        try:
            for op, arg, _ in pickletools.genops(stream):
                pushed = None
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif op.name in _STRING_OPS:
                    pushed = str(arg)
                elif op.name == "MEMOIZE":
                    if last is not None:
                        memo[memo_count] = last
                    memo_count += 1
                elif op.name in _PUT_OPS and last is not None:
                    memo[arg] = last
                elif op.name in _GET_OPS and arg in memo:
                    pushed = memo[arg]
                if pushed is not None:
                    strings.append(pushed)
                last = pushed if pushed is not None else (last if op.name in _PUT_OPS | {"MEMOIZE"} else None)
        except Exception:  # the rest is not a pickle (garbage, or a legacy file's raw tensor data)
            break
        names.append(found)
    return names
