"""Atomic writes leave no half-written file; pickles that import code are refused without running it."""

import os
import pickle

import pytest
import torch

from library.errors import UserError
from library.io import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    check_safetensors,
    load_pickle_checkpoint,
    load_safetensors,
    pickle_imports,
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
