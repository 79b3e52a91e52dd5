"""A full disk (a real, tiny tmpfs), a file size limit and other OS write failures give one line naming the file,
leave no temporary and keep the previous file intact."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from library.cli import run_cli
from library.dataset.latent_cache import CacheJob, cache_latents, npz_path_for
from library.errors import UserError
from library.io import DiskWriteError, atomic_dir, atomic_path, atomic_save, atomic_write_bytes, save_safetensors
from library.models.tiny import make_tiny_model
from library.state import save_training_state
from tests.images import write_image

BIG = 4 << 20  # bytes; far more than the tmpfs holds


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[str], Path]]:
    """``small_disk(size)``: a fresh tmpfs of ``size`` (e.g. "512k") mounted in tmp_path; skipped where mounting
    is not permitted (it needs root or CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


def _fill(folder: Path) -> None:
    """Write a filler file until the file system is full."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 4096):
            pass


def _no_space(path: Path, kind: str = "file", existed: bool = True) -> str:
    before = f"the previous {kind} is intact" if existed else f"no partial {kind} was left"
    return f"{path}: no space left on device while writing; {before}; free space and rerun"


WRITERS = {
    "bytes": lambda path: atomic_write_bytes(path, b"x" * BIG),
    "safetensors": lambda path: save_safetensors({"w": torch.ones(BIG // 4)}, path),
    "torch.save": lambda path: atomic_save(path, lambda tmp: torch.save({"w": torch.ones(BIG // 4)}, tmp)),
    "npz": lambda path: atomic_save(path, lambda tmp: np.savez(open(tmp, "wb"), latents=np.ones(BIG // 4))),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_full_disk_names_the_file_and_keeps_the_previous_one(small_disk, writer):
    disk = small_disk("512k")
    path = disk / "model.out"
    path.write_bytes(b"previous")
    with pytest.raises(DiskWriteError) as caught:
        WRITERS[writer](path)
    assert str(caught.value) == _no_space(path)
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, UserError) and isinstance(caught.value, OSError)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in disk.iterdir()) == ["model.out"]
    with pytest.raises(DiskWriteError, match="^" + _no_space(disk / "new.out", existed=False) + "$"):
        WRITERS[writer](disk / "new.out")
    assert sorted(p.name for p in disk.iterdir()) == ["model.out"]


def test_full_disk_inside_a_folder_names_the_folder(small_disk):
    disk = small_disk("512k")
    with atomic_dir(disk / "run-state") as tmp:
        (tmp / "old.bin").write_bytes(b"previous")
    with pytest.raises(UserError) as caught:
        with atomic_dir(disk / "run-state") as tmp:
            torch.save({"w": torch.ones(BIG // 4)}, tmp / "optimizer.bin")
    assert str(caught.value) == _no_space(disk / "run-state", "folder")
    with pytest.raises(UserError) as caught:  # a nested atomic write fails: still the outer folder is named
        with atomic_dir(disk / "run-state") as tmp:
            atomic_write_bytes(tmp / "train_state.json", b"x" * BIG)
    assert str(caught.value) == _no_space(disk / "run-state", "folder")
    assert sorted(p.name for p in disk.iterdir()) == ["run-state"]
    assert [p.read_bytes() for p in (disk / "run-state").iterdir()] == [b"previous"]


def test_full_disk_during_accelerate_state_save(small_disk):
    from accelerate import Accelerator

    disk = small_disk("256k")
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(UserError) as caught:
        save_training_state(accelerator, disk / "lora-step00000002-state", {"global_step": 2})
    assert str(caught.value) == _no_space(disk / "lora-step00000002-state", "folder", existed=False)
    assert list(disk.iterdir()) == []


def test_full_disk_during_latent_caching(small_disk):
    disk = small_disk("1m")
    vae = make_tiny_model(seed=0).vae
    jobs = [CacheJob(write_image(disk / f"img{n}.png", (64, 64), seed=n), (64, 64), (64, 64), (64, 64)) for n in (0, 1)]
    cache_latents(jobs, vae, to_disk=True, progress=False)
    npz = npz_path_for(jobs[1].path, (64, 64))
    before = npz.read_bytes()
    write_image(jobs[1].path, (64, 64), seed=7)  # edited: its cache file is stale
    _fill(disk)
    with pytest.raises(UserError) as caught:
        cache_latents(jobs, vae, to_disk=True, progress=False)
    assert str(caught.value) == _no_space(npz)
    assert npz.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == sorted(
        ["filler", "img0.png", "img1.png", "img0_0064x0064_sd.npz", "img1_0064x0064_sd.npz"]
    )


def test_full_disk_is_one_line_from_the_command_line(small_disk, capsys):
    disk = small_disk("256k")

    def main(argv: list[str]) -> None:
        save_safetensors({"w": torch.ones(BIG // 4)}, disk / "lora.safetensors")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == f"error: {_no_space(disk / 'lora.safetensors', existed=False)}\n"


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE: the kernel refuses writes past ``limit`` bytes with EFBIG (no privileges needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_other_os_write_failures_name_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    with _file_size_limit(1 << 20):
        with pytest.raises(DiskWriteError) as plain:
            atomic_write_bytes(path, b"x" * BIG)
        with pytest.raises(DiskWriteError) as by_torch:
            atomic_save(path, lambda tmp: torch.save({"w": torch.ones(BIG // 4)}, tmp))
        with pytest.raises(DiskWriteError) as by_safetensors:
            save_safetensors({"w": torch.ones(BIG // 4)}, path)
    assert str(plain.value) == (
        f"{path}: file too large for this file system while writing; the previous file is intact; "
        "write to another file system and rerun"
    )
    assert str(by_safetensors.value) == str(plain.value)
    # torch does not pass the OS error on, and the disk is not full: a general message
    assert str(by_torch.value) == (
        f"{path}: the file system refused a write; the previous file is intact; "
        "check free space, quota and permissions and rerun"
    )
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_temporary_that_cannot_be_created_names_the_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(DiskWriteError) as caught:
        atomic_write_bytes(blocker / "model.safetensors", b"x")
    assert str(caught.value) == (
        f"{blocker / 'model.safetensors'}: a file is in the way of a folder while writing; no partial file was left; "
        "remove or rename it and rerun"
    )
    assert caught.value.errno in (errno.EEXIST, errno.ENOTDIR)


def test_atomic_path_keeps_working_after_a_failure(tmp_path):
    with _file_size_limit(1 << 16):
        with pytest.raises(DiskWriteError):
            with atomic_path(tmp_path / "a.bin") as tmp:
                tmp.write_bytes(b"x" * (1 << 17))
    atomic_write_bytes(tmp_path / "a.bin", b"ok")
    assert os.listdir(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"ok"
