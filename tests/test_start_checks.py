"""Problems that would only show after all training are refused before step 1, as one line (exit code 2)."""

from __future__ import annotations

import pytest

import train_db
import train_network
from library.cli import run_cli
from library.saving import NAME_MAX, check_output_location
from tests.training import network_args, run_args, write_frog_dataset


def run_network(tmp_path, capsys, out, *extra: str) -> tuple[int, list[str]]:
    data = write_frog_dataset(tmp_path / "data")
    code = run_cli(train_network.main, network_args("tiny-sd1", data, out, "--max_train_steps", "1", *extra))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda tmp: tmp / "a_file", "is a file, not a folder"),
        (lambda tmp: tmp / "a_file" / "out", "a_file is not a folder, so nothing can be created under it"),
    ],
)
def test_an_output_dir_that_cannot_be_a_folder_stops_before_training(tmp_path, capsys, where, message):
    (tmp_path / "a_file").write_text("not a folder")
    code, errors = run_network(tmp_path, capsys, where(tmp_path))
    assert code == 2 and len(errors) == 1 and message in errors[0] and "--output_dir" in errors[0]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_an_output_name_too_long_for_the_file_system_stops_before_training(tmp_path, capsys):
    code, errors = run_network(tmp_path, capsys, tmp_path / "out", "--output_name", "n" * 200)
    assert code == 2 and errors == [
        "error: --output_name: 200 bytes is too long for the saved files' names (with step number, extension and "
        "temporary suffix); use at most 184 bytes"
    ]
    assert not (tmp_path / "out").exists()


def test_the_longest_allowed_output_name_fits_every_temporary_name(tmp_path):
    """184 bytes passes; the longest name a save makes is then a temporary of a step model, exactly at the limit
    the check assumes (one more byte is refused)."""
    check_output_location(tmp_path, "n" * 184)
    with pytest.raises(Exception, match="use at most 184 bytes"):
        check_output_location(tmp_path, "n" * 185)
    longest_final = "n" * 184 + "-step00000000" + ".safetensors"
    temporary = "." + longest_final + ".4294967295-0123abcd-0123abcd" + ".safetensors" + ".tmp"
    assert len(temporary) == NAME_MAX


def test_fp16_mixed_precision_on_the_cpu_is_one_line(tmp_path, capsys):
    """accelerate has no fp16 autocast on the CPU: train_db.py used to stop at the first step with a dtype error."""
    data = write_frog_dataset(tmp_path / "data")
    argv = [*run_args(tmp_path / "out", name="db", learning_rate="1e-4", seed=1, model="tiny-sd1")]
    argv += ["--train_data_dir", str(data), "--max_train_steps", "1", "--mixed_precision", "fp16"]
    assert run_cli(train_db.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --mixed_precision fp16: accelerate has no fp16 autocast")
