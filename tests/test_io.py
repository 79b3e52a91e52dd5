"""Atomic writes leave no half-written file, follow the umask and clean up after a kill; pickles that import code
are refused without running it."""

import errno
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import library.io as io_module
from library.errors import UserError
from library.io import (
    atomic_dir,
    atomic_path,
    atomic_save,
    atomic_write_json,
    check_safetensors,
    load_pickle_checkpoint,
    load_safetensors,
    pickle_imports,
    remove_stale_temporaries,
    save_safetensors,
)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_dir_replaces_folder_only_when_complete(tmp_path):
    final = tmp_path / "state"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "b.txt").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_safetensors_round_trip_with_shared_storage_and_metadata(tmp_path):
    base = torch.arange(6.0)
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": base, "b": base[:3]}, path, metadata={"ss_k": "v"})
    tensors, metadata = load_safetensors(path)
    assert torch.equal(tensors["a"], base) and torch.equal(tensors["b"], base[:3])
    assert metadata == {"ss_k": "v"}
    atomic_write_json(tmp_path / "j.json", {"k": 1})
    assert (tmp_path / "j.json").read_text() == '{\n  "k": 1\n}\n'


def test_truncated_safetensors_is_named_in_one_line(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_safetensors({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"cut.safetensors: truncated safetensors file"):
        check_safetensors(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_pickle_that_imports_code_is_refused_and_never_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": _Payload(marker)}, protocol=protocol))
    assert "posix.system" in pickle_imports(path)
    with pytest.raises(UserError, match=r"evil.ckpt: this pickle checkpoint wants to run code .*posix.system"):
        load_pickle_checkpoint(path)
    assert not marker.exists()


def test_plain_weights_pickle_loads_and_garbage_is_unreadable(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_pickle_checkpoint(good)["state_dict"]["w"], torch.ones(2))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04" + bytes(range(200)))
    with pytest.raises(UserError, match=r"garbage.ckpt: not a readable checkpoint \(truncated, corrupt"):
        load_pickle_checkpoint(garbage, allow_unsafe=True)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    save_safetensors({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    atomic_save(tmp_path / "c.pt", lambda tmp: torch.save({"w": torch.ones(2)}, tmp))
    with atomic_dir(tmp_path / "d-state") as tmp:
        (tmp / "x.txt").write_text("1")
    with atomic_dir(tmp_path / "d-state") as tmp:  # replacing an existing folder
        (tmp / "y.txt").write_text("2")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    assert modes == {"a.json": file_mode, "b.safetensors": file_mode, "c.pt": file_mode, "d-state": folder_mode}
    assert sorted(p.name for p in (tmp_path / "d-state").iterdir()) == ["y.txt"]


def test_a_folder_in_place_of_a_file_and_a_file_in_place_of_a_folder_are_named(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(
        UserError, match=r"^.*model\.safetensors: a folder is where this file should be written; remove"
    ):
        save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(
        OSError
    ) as caught:  # also an OSError, for callers that treat a failed optional write as a warning
        atomic_write_json(tmp_path / "model.safetensors", {})
    assert caught.value.errno == errno.EISDIR
    (tmp_path / "state").write_text("user file")
    with pytest.raises(UserError, match=r"^.*state: a file is where this folder should be written; remove or rename"):
        with atomic_dir(tmp_path / "state"):
            pass
    assert (tmp_path / "state").read_text() == "user file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "state"]


def test_a_writer_bug_is_not_reported_as_a_disk_problem(tmp_path):
    with pytest.raises(ValueError, match="^bad tensor$"):
        atomic_save(tmp_path / "x.pt", lambda tmp: (_ for _ in ()).throw(ValueError("bad tensor")))
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last-state").mkdir()
    (out / "last-state" / "old.txt").write_text("previous state")
    user_names = [
        ".model.safetensors.tmp",
        "model.tmp",
        ".x.123-abc.tmp",
        ".x.12-0123abcd-0123abcd.tmp.bak",
        "x.12-0123abcd-0123abcd.tmp",
        ".x.0-0123abcd-0123abcd.tmp",
        ".x.12-0123ABCD-0123abcd.tmp",
        ".x.12-0123abcd-0123abc.tmp",
        ".state.old",
    ]
    for name in user_names:
        (out / name).write_text("user data")
    writer = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from library.io import atomic_dir, atomic_path
        out = Path({str(out)!r})
        with atomic_dir(out / "run-step5-state") as d:
            (d / "model.safetensors").write_bytes(b"x" * 1000)
            with atomic_dir(out / "last-state") as e, atomic_path(out / "run.safetensors", suffix=".npz") as t:
                t.write_bytes(b"half")
                print("ready", flush=True)
                time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    try:
        assert child.stdout.readline() == "ready\n"
        temporaries = sorted(p.name for p in out.iterdir() if p.name not in user_names and p.name != "last-state")
        assert [re.sub(r"\d+-[0-9a-f]{8}-[0-9a-f]{8}", "P-O-R", n) for n in temporaries] == [
            ".last-state.P-O-R.tmp",
            ".run-step5-state.P-O-R.tmp",
            ".run.safetensors.P-O-R.npz.tmp",
        ]
        assert remove_stale_temporaries(out) == []  # the writer is alive
    finally:
        child.kill()
        child.wait()
    removed = remove_stale_temporaries(out)
    assert sorted(p.name for p in removed) == temporaries
    assert sorted(p.name for p in out.iterdir()) == sorted([*user_names, "last-state"])
    assert (out / "last-state" / "old.txt").read_text() == "previous state"
    assert all((out / name).read_text() == "user data" for name in user_names)


def test_temporaries_from_elsewhere_wait_until_idle_and_a_half_swapped_folder_is_restored(tmp_path):
    other = ".a.safetensors.4242-00000000-0123abcd.tmp"
    (tmp_path / other).write_bytes(b"partial")
    dead = _dead_pid()
    origin = io_module._ORIGIN
    old = tmp_path / f".state.{dead}-{origin}-89abcdef.old.tmp"  # killed between atomic_dir's two renames
    old.mkdir()
    (old / "f.txt").write_text("complete previous state")
    old_beside = tmp_path / f".kept.{dead}-{origin}-89abcdef.old.tmp"
    old_beside.mkdir()
    (tmp_path / "kept").mkdir()
    assert remove_stale_temporaries(tmp_path) == [old_beside]
    assert (tmp_path / "state" / "f.txt").read_text() == "complete previous state"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other, "kept", "state"])
    time.sleep(0.01)
    assert remove_stale_temporaries(tmp_path, stale_after_s=0) == [tmp_path / other]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_removal_interrupted_midway_leaves_nothing_half_deleted_under_the_name(tmp_path, monkeypatch):
    """An old state folder is renamed to one of our temporaries before it is deleted, so a kill during the deletion
    leaves a temporary (cleaned at the next start), never a half-deleted state under its final name."""
    state = tmp_path / "lora-step00000002-state"
    state.mkdir()
    (state / "optimizer.bin").write_bytes(b"x" * 10)
    (state / "train_state.json").write_text("{}")

    def killed(path, *args, **kwargs):
        (Path(path) / "optimizer.bin").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        io_module.remove_atomically(state)
    assert not state.exists()
    (left,) = list(tmp_path.iterdir())
    assert io_module._TEMP_NAME.match(left.name) and left.name.startswith(".lora-step00000002-state.")
    assert sorted(p.name for p in left.iterdir()) == ["train_state.json"]
    monkeypatch.undo()
    assert io_module.remove_atomically(left) and not io_module.remove_atomically(state)
    assert list(tmp_path.iterdir()) == []
