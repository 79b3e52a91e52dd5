"""tools/show_metadata.py on a LoRA trained by train_network.py and on hand-made files: grouped, sorted lines,
JSON values pretty-printed or summarised, ``--json`` giving back the file's metadata, and the header read alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

import train_network
from library.cli import run_cli
from tests.conftest import REPO
from tests.training import network_args, write_dataset_toml, write_frog_dataset
from tools import show_metadata


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory, one_torch_thread) -> Path:
    """A LoRA (with conv_dim network args, a two-line comment and a title) trained one step from a dataset TOML."""
    root = tmp_path_factory.mktemp("meta")
    data = write_frog_dataset(root / "data")
    subset = {"image_dir": str(data / "1_frog"), "num_repeats": 1, "caption_extension": ".txt"}
    toml = write_dataset_toml(root / "data.toml", [{"resolution": 64, "batch_size": 1, "subsets": [subset]}])
    extra = ["--dataset_config", str(toml), "--max_train_steps", "1", "--metadata_title", "Frog"]
    extra += ["--training_comment", "first line\nsecond line", "--network_args", "conv_dim=2", "conv_alpha=1"]
    train_network.main(network_args(model_dir, None, root / "out", *extra))
    return root / "out" / "lora.safetensors"


def raw_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def tensor_count(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


def show(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_cli(show_metadata.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_trained_lora_metadata_is_grouped_sorted_and_pretty(trained, capsys):
    code, out, _ = show(capsys, str(trained))
    lines = out.splitlines()
    raw = raw_metadata(trained)
    assert code == 0
    assert lines[0] == f"{trained}: {len(raw)} metadata key(s), {tensor_count(trained)} tensor(s)"
    ss_count = sum(k.startswith("ss_") for k in raw)
    assert lines[1] == f"training (ss_*): {ss_count} key(s)"
    for line in (
        "  ss_network_module: networks.lora",
        "  ss_network_dim: 4",
        "  ss_network_alpha: 2.0",
        "  ss_max_train_steps: 1",
        "  ss_base_model_version: sd_v1",
    ):
        assert line in lines
    i = lines.index("  ss_network_args:")
    assert lines[i + 1 : i + 4] == ["    {", '      "conv_dim": "2",', '      "conv_alpha": "1"']
    i = lines.index("  ss_training_comment:")
    assert lines[i + 1 : i + 3] == ["    first line", "    second line"]
    chars = len(raw["ss_tag_frequency"])
    assert (
        f"  ss_tag_frequency: 1 folder(s), 5 distinct tag(s), {chars} chars (--full shows them); most frequent: "
        "a frog (4), number 0 (1), number 1 (1), number 2 (1), number 3 (1)"
    ) in lines
    # the tag counts inside ss_datasets are summarised the same way
    assert (
        f'        "tag_frequency": "1 folder(s), 5 distinct tag(s), {chars} chars (--full shows them); most frequent: '
        'a frog (4), number 0 (1), number 1 (1), number 2 (1), number 3 (1)",'
    ) in lines
    ss_keys = [line.split(":")[0].strip() for line in lines[2:] if line.startswith("  ss_")]
    assert ss_keys == sorted(k for k in raw if k.startswith("ss_"))
    assert lines.index("hashes (sshs_*): 2 key(s)") < lines.index("modelspec (modelspec.*): 7 key(s)")
    assert "  modelspec.title: Frog" in lines
    assert "  modelspec.architecture: stable-diffusion-v1/lora" in lines
    assert f"  sshs_model_hash: {raw['sshs_model_hash']}" in lines


def test_full_prints_tag_frequency_and_json_gives_back_the_metadata(trained, capsys):
    raw = raw_metadata(trained)
    _, out, _ = show(capsys, "--model", str(trained), "--full")
    lines = out.splitlines()
    i = lines.index("  ss_tag_frequency:")
    assert json.loads("\n".join(lines[i + 1 : i + 10])) == json.loads(raw["ss_tag_frequency"])
    _, out, _ = show(capsys, str(trained), "--json")
    parsed = json.loads(out)
    assert list(parsed) == sorted(raw)
    for key, value in parsed.items():
        assert value == (raw[key] if isinstance(value, str) else json.loads(raw[key])), key
    assert parsed["ss_network_args"] == {"conv_dim": "2", "conv_alpha": "1"}
    assert parsed["ss_datasets"][0]["subsets"][0]["img_count"] == 4
    assert parsed["ss_network_dim"] == "4" and parsed["ss_v2"] == "False"


def test_only_the_header_is_read(trained, tmp_path, capsys):
    """A file cut right after its header still shows every key (the tensors are never read), with a warning."""
    data = trained.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + header_len + 10])
    code, out, err = show(capsys, str(cut), "--json")
    assert code == 0
    assert json.loads(out) == json.loads(show(capsys, str(trained), "--json")[1])
    assert f"{cut}: the tensor data is cut short ({8 + header_len + 10} bytes" in err


def test_long_values_are_summarised_and_other_keys_grouped(tmp_path, capsys):
    thumbnail = "data:image/png;base64," + "A" * 2000
    merged = json.dumps({f"model{i}": "x" * 20 for i in range(60)})
    path = tmp_path / "emb.safetensors"
    save_file(
        {"emb_params": torch.zeros(1, 4)},
        str(path),
        {"modelspec.thumbnail": thumbnail, "ss_merged": merged, "custom": "{not json", "format": "pt"},
    )
    _, out, _ = show(capsys, str(path))
    assert out.splitlines()[1:] == [
        "training (ss_*): 1 key(s)",
        f"  ss_merged: JSON object with 60 key(s), {len(merged)} chars (--full shows it)",
        "modelspec (modelspec.*): 1 key(s)",
        f"  modelspec.thumbnail: {thumbnail[:60]}… ({len(thumbnail)} chars; --full shows it)",
        "other: 2 key(s)",
        "  custom: {not json",
        "  format: pt",
    ]
    _, out, _ = show(capsys, str(path), "--full")
    assert f"  modelspec.thumbnail: {thumbnail}" in out.splitlines()


def test_no_metadata_is_one_line(tmp_path, capsys):
    path = tmp_path / "bare.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(path))
    assert show(capsys, str(path))[1] == f"{path}: no metadata (2 tensor(s))\n"
    assert show(capsys, str(path), "--json")[1] == "{}\n"


def _garbage(tmp: Path) -> Path:
    (tmp / "g.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return tmp / "g.safetensors"


def _short_header(tmp: Path) -> Path:
    (tmp / "s.safetensors").write_bytes((500).to_bytes(8, "little") + b'{"__metadata__": {')
    return tmp / "s.safetensors"


def _ckpt(tmp: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp / "m.ckpt")
    return tmp / "m.ckpt"


def _pickle_named_safetensors(tmp: Path) -> Path:
    torch.save({"w": torch.zeros(1)}, tmp / "p.safetensors")
    return tmp / "p.safetensors"


@pytest.mark.parametrize(
    "make, message",
    [
        (_garbage, "not a safetensors file (its header is not JSON)"),
        (_short_header, "truncated safetensors file (the header alone needs 500 bytes, the file has 18"),
        (_ckpt, "a pickle checkpoint (.ckpt); show_metadata.py reads only .safetensors files and never unpickles"),
        (_pickle_named_safetensors, "a pickle checkpoint (by its content); show_metadata.py reads only"),
        (lambda tmp: tmp / "missing.safetensors", "file not found"),
    ],
)
def test_bad_files_are_one_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, out, err = show(capsys, str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1


def test_a_header_length_that_starts_like_a_pickle_is_read(tmp_path, capsys):
    """A header of 640 bytes starts the file with 0x80 0x02, a pickle's first two bytes: still a safetensors file."""
    data = next(
        blob
        for n in range(800)
        if int.from_bytes((blob := save({"w": torch.zeros(2)}, {"pad": "x" * n}))[:8], "little") == 640
    )
    assert data[:2] == b"\x80\x02"
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert json.loads(show(capsys, str(path), "--json")[1]) == {"pad": json.loads(data[8:648])["__metadata__"]["pad"]}


def test_file_given_twice_or_not_at_all(capsys):
    for argv in ([], ["a.safetensors", "--model", "b.safetensors"]):
        code, _, err = show(capsys, *argv)
        assert code == 2 and "give the file once, as the positional argument or with --model" in err


def test_runs_as_a_script_with_sd_scripts_flag(trained):
    done = subprocess.run(
        [sys.executable, "tools/show_metadata.py", "--model", str(trained)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "  ss_network_module: networks.lora" in done.stdout.splitlines()
