"""Entry scripts turn bad input into one line on stderr and a non-zero exit; --debug shows the traceback."""

import subprocess
import sys

import pytest

from library.cli import run_cli, wants_debug
from library.errors import UserError
from tests.conftest import REPO


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


def test_unimplemented_script_exits_cleanly_without_traceback():
    proc = subprocess.run([sys.executable, "train_db.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: train_db.py")
    assert len(proc.stderr.strip().splitlines()) == 1
