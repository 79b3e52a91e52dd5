"""Entry scripts turn bad input into one line on stderr and a non-zero exit; --debug shows the traceback."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from library.cli import ArgumentParser, run_cli, wants_debug
from library.errors import UserError
from tests.conftest import REPO

SCRIPTS = ["train_network.py", "train_db.py", "fine_tune.py", "train_textual_inversion.py"]


def _fails(argv):
    raise UserError("data.toml: datasets[0]: unknown key 'reso' (did you mean 'resolution'?)")


def test_user_error_is_one_line_and_exit_code_2(capsys):
    assert run_cli(_fails, []) == 2
    err = capsys.readouterr().err
    assert err == "error: data.toml: datasets[0]: unknown key 'reso' (did you mean 'resolution'?)\n"


def test_debug_flag_reraises_with_traceback():
    with pytest.raises(UserError):
        run_cli(_fails, ["--debug"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--debug"], True),
        (["--console_log_level", "debug"], True),
        (["--console_log_level=DEBUG"], True),
        (["--console_log_level", "INFO"], False),
    ],
)
def test_wants_debug(argv, expected, monkeypatch):
    monkeypatch.delenv("SDTRAIN_DEBUG", raising=False)
    assert wants_debug(argv) is expected


def test_unknown_flags_are_one_line_with_a_suggestion():
    parser = ArgumentParser(prog="train_network.py")
    parser.add_argument("--network_dim", type=int)
    with pytest.raises(UserError) as info:
        parser.parse_args(["--netwrok_dim", "4", "--zzz"])
    assert str(info.value) == (
        "train_network.py: unknown argument(s): --netwrok_dim (did you mean --network_dim?), --zzz; see --help"
    )
    with pytest.raises(UserError, match=r"^train_network.py: argument --network_dim: invalid int value: 'four'"):
        parser.parse_args(["--network_dim", "four"])


def missing_model_argv(script: str, tmp_path: Path) -> tuple[list[str], Path]:
    """The command line (after the script name) that points ``script`` at a model file that does not exist."""
    missing = tmp_path / "missing.safetensors"
    argv = ["--pretrained_model_name_or_path", str(missing), "--output_dir", str(tmp_path)]
    argv += ["--train_data_dir", str(tmp_path), "--token_string", "tok"] if "inversion" in script else []
    argv += [] if "inversion" in script else ["--train_data_dir", str(tmp_path)]
    return argv, missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_model_file_is_one_line_naming_it(script, tmp_path, monkeypatch, capsys):
    """Each script's own ``__main__`` block, run in this process (one real subprocess is checked below)."""
    argv, missing = missing_model_argv(script, tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {missing}: model file or folder not found; check --pretrained_model_name_or_path\n"
    )


def test_missing_model_file_is_one_line_from_a_real_process(tmp_path):
    argv, missing = missing_model_argv("train_textual_inversion.py", tmp_path)
    proc = subprocess.run(
        [sys.executable, "train_textual_inversion.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {missing}: model file or folder not found; check --pretrained_model_name_or_path\n"


def test_console_log_file_gets_start_up_messages_and_the_error(tmp_path, capsys):
    """--console_log_file writes the log (and the final error line) to a file as well as to stderr."""
    import train_network

    log, missing = tmp_path / "run.log", tmp_path / "missing.safetensors"
    argv = ["--pretrained_model_name_or_path", str(missing), "--output_dir", str(tmp_path)]
    argv += ["--train_data_dir", str(tmp_path), "--console_log_file", str(log), "--console_log_simple"]
    argv += ["--resume", "latest"]
    assert run_cli(train_network.main, argv) == 2
    info = f"--resume latest: no state of this run in {tmp_path} yet: starting from the beginning"
    error = f"error: {missing}: model file or folder not found; check --pretrained_model_name_or_path"
    lines = log.read_text().splitlines()
    assert f" INFO {info}" in lines[0]
    assert lines[-1].endswith(f" ERROR {error}")
    err = capsys.readouterr().err
    assert info in err and err.endswith(error + "\n")


def test_console_log_level_sets_the_level_and_unwritable_log_files_are_named(tmp_path):
    import logging

    import train_network
    from library.config.config_file import parse_args_with_config

    parse_args_with_config(train_network.setup_parser(), ["--console_log_level", "warning"])
    assert logging.getLogger("sdtrain").level == logging.WARNING
    parse_args_with_config(train_network.setup_parser(), [])
    assert logging.getLogger("sdtrain").level == logging.INFO
    bad = tmp_path / "no" / "such" / "dir" / "x.log"
    with pytest.raises(UserError, match=rf"^--console_log_file {bad}: cannot write it \(No such file or directory\)"):
        parse_args_with_config(train_network.setup_parser(), ["--console_log_file", str(bad)])


def test_an_error_message_is_always_one_capped_line(capsys):
    """A message that embeds line breaks or echoes a huge value still prints as one line of bounded length."""
    from library.cli import MAX_ERROR_CHARS

    def fails(argv):
        raise UserError("data.toml: bad value 'first\nsecond\r\nthird' " + "x" * 5000)

    assert run_cli(fails, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.toml: bad value 'first\\nsecond\\nthird' xxx")
    assert len(err.rstrip("\n")) == len("error: ") + MAX_ERROR_CHARS and err.rstrip("\n").endswith("…")


def test_output_into_a_closed_pipe_ends_quietly():
    """``tool | head``: the reader stops early; the tool exits 0 without a BrokenPipeError traceback."""
    program = (
        "import sys; from library.cli import run_cli; sys.exit(run_cli(lambda argv: [print(i) for i in range(10**7)]))"
    )
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert child.stdout.readline() == b"0\n"
    child.stdout.close()
    assert child.wait(timeout=60) == 0
    assert child.stderr.read() == b""
