"""--preset / --list_presets / --preset_dir: the shipped presets parse for their scripts, the precedence
defaults < preset < --config_file < command line, user folders shadowing shipped presets, one-line errors."""

from __future__ import annotations

import functools
import importlib
import shlex

import pytest
import torch

import train_network
from library.cli import run_cli
from library.config.config_file import parse_args_with_config
from library.config.presets import ENV_VAR, SHIPPED_DIR, available_presets, preset_dirs, read_preset
from library.errors import UserError

SHIPPED = {
    "sd15-lora-8gb": ["train_network.py"],
    "sd15-lora-quality": ["train_network.py"],
    "sd15-loha": ["train_network.py"],
    "sd15-finetune-adafactor": ["fine_tune.py"],
    "sd15-dreambooth": ["train_db.py"],
    "sd15-ti": ["train_textual_inversion.py", "train_textual_inversion_XTI.py"],
}


@pytest.fixture(autouse=True)
def no_user_presets(tmp_path, monkeypatch):
    """Keep the developer's own preset folders out of every test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV_VAR, raising=False)


@functools.cache
def script_module(script: str):
    return importlib.import_module(script.removesuffix(".py"))


def parser_for(script: str):
    """The script's real parser (train_textual_inversion_XTI.py takes train_textual_inversion.py's flags)."""
    parser = script_module(script.replace("_XTI", "")).setup_parser()
    parser.prog = script  # what argparse names the parser when the script runs as `python <script>`
    return parser


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def command_line(values: dict) -> list[str]:
    """The flags a preset sets, written out as a command line."""
    argv: list[str] = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def test_the_shipped_presets_are_the_documented_ones():
    found = available_presets(preset_dirs())
    assert {name: list(read_preset(f).scripts) for name, f in found.items()} == SHIPPED
    docs = (SHIPPED_DIR.parent / "docs" / "presets.md").read_text()
    for name, scripts in SHIPPED.items():
        assert f"| `{name}` | `{scripts[0]}`" in docs


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_preset_equals_its_flags_on_the_command_line(name, tmp_path):
    """Every key is a real flag of each script the preset names, with a valid value: the preset gives exactly
    the namespace its keys written as command-line flags give; the optimizer, LR schedule, network arguments
    and loop settings it names are accepted by the code that uses them."""
    from library.engine.config import EngineConfig
    from library.optimizers import make_optimizer
    from library.schedulers import make_lr_scheduler

    preset = read_preset(available_presets(preset_dirs())[name])
    assert preset.description and len(preset.description) <= 120
    assert all(not isinstance(v, dict) for v in preset.values.values())
    for script in preset.scripts:
        args = parse_args_with_config(parser_for(script), ["--preset", name])
        plain = parse_args_with_config(parser_for(script), command_line(preset.values))
        assert args.preset == [name]
        assert {k: v for k, v in vars(args).items() if k != "preset"} == {
            k: v for k, v in vars(plain).items() if k != "preset"
        }

        param = torch.nn.Parameter(torch.zeros(4, 4))
        setup = make_optimizer(
            args.optimizer_type, [param], args.learning_rate, args.optimizer_args, use_8bit_adam=args.use_8bit_adam
        )
        make_lr_scheduler(args.lr_scheduler, setup.optimizer, 1000, args.lr_warmup_steps)
        args.output_dir = str(tmp_path / "out")
        EngineConfig.from_args(args)
        if hasattr(args, "network_module"):
            from networks.lora import KNOWN_NETWORK_ARGS

            importlib.import_module(args.network_module)
            assert {a.split("=")[0] for a in args.network_args or []} <= KNOWN_NETWORK_ARGS


def test_a_preset_for_other_scripts_is_refused_by_name():
    with pytest.raises(UserError, match=r"preset 'sd15-ti' .* is for train_textual_inversion.py.*not train_network.py"):
        parse_args_with_config(parser_for("train_network.py"), ["--preset", "sd15-ti"])


def test_precedence_defaults_preset_config_file_command_line(tmp_path):
    folder = tmp_path / "mine"
    write(folder / "base.toml", 'description = "base"\nlearning_rate = 1e-3\nnetwork_dim = 7\nmax_grad_norm = 0.5\n')
    config = write(tmp_path / "cfg.toml", "learning_rate = 2e-3\nnetwork_dim = 9\n")
    argv = ["--preset", "base", "--preset_dir", str(folder), "--config_file", str(config), "--learning_rate", "3e-3"]
    args = parse_args_with_config(train_network.setup_parser(), argv)
    assert args.learning_rate == 3e-3  # preset, config file and flag: the flag wins
    assert args.network_dim == 9  # preset and config file: the config file wins
    assert args.max_grad_norm == 0.5  # preset only: the preset wins over the default (1.0)
    assert args.network_alpha == 1  # nowhere: the default
    assert args.preset == ["base"]


def test_presets_layer_in_order_and_a_config_file_may_name_them(tmp_path):
    folder = tmp_path / "mine"
    write(folder / "a.toml", 'description = "a"\nnetwork_dim = 4\nnetwork_alpha = 2\n')
    write(folder / "b.toml", 'description = "b"\n[network]\nnetwork_dim = 8\n')
    args = parse_args_with_config(
        train_network.setup_parser(), ["--preset_dir", str(folder), "--preset", "a", "--preset", "b"]
    )
    assert (args.network_dim, args.network_alpha, args.preset) == (8, 2.0, ["a", "b"])

    config = write(tmp_path / "cfg.toml", f'preset = ["b", "a"]\npreset_dir = "{folder}"\nnetwork_alpha = 3\n')
    args = parse_args_with_config(train_network.setup_parser(), ["--config_file", str(config)])
    assert (args.network_dim, args.network_alpha, args.preset) == (4, 3.0, ["b", "a"])
    # --preset on the command line replaces the config file's presets
    args = parse_args_with_config(train_network.setup_parser(), ["--config_file", str(config), "--preset", "b"])
    assert (args.network_dim, args.network_alpha, args.preset) == (8, 3.0, ["b"])


def test_a_preset_file_path_works_and_output_config_folds_it_in(tmp_path):
    preset = write(tmp_path / "p" / "x.toml", 'description = "x"\nnetwork_dim = 5\n')
    args = parse_args_with_config(train_network.setup_parser(), ["--preset", str(preset)])
    assert args.network_dim == 5
    out = tmp_path / "written.toml"
    argv = ["--preset", str(preset), "--network_alpha", "2", "--config_file", str(out), "--output_config"]
    assert parse_args_with_config(train_network.setup_parser(), argv) is None
    text = out.read_text()
    assert "network_dim = 5\n" in text and "network_alpha = 2.0\n" in text and "preset" not in text
    again = parse_args_with_config(train_network.setup_parser(), ["--config_file", str(out)])
    assert (again.network_dim, again.network_alpha) == (5, 2.0)


def test_user_folders_shadow_shipped_presets_in_search_order(tmp_path, monkeypatch):
    default_dir = tmp_path / "xdg" / "sd-trainer" / "presets"
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    write(default_dir / "sd15-lora-8gb.toml", 'description = "mine"\nnetwork_dim = 3\n')
    parser = train_network.setup_parser
    assert parse_args_with_config(parser(), ["--preset", "sd15-lora-8gb"]).network_dim == 3
    assert parse_args_with_config(parser(), ["--preset", "sd15-lora-8gb"]).optimizer_type == ""  # not layered

    write(env_dir / "sd15-lora-8gb.toml", 'description = "env"\nnetwork_dim = 5\n')
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert parse_args_with_config(parser(), ["--preset", "sd15-lora-8gb"]).network_dim == 5

    write(flag_dir / "sd15-lora-8gb.toml", 'description = "flag"\nnetwork_dim = 6\n')
    argv = ["--preset", "sd15-lora-8gb", "--preset_dir", str(flag_dir)]
    assert parse_args_with_config(parser(), argv).network_dim == 6


def test_list_presets_prints_every_preset_and_what_shadows_what(tmp_path, capsys):
    folder = tmp_path / "mine"
    write(folder / "sd15-ti.toml", 'description = "my TI settings"\nscripts = ["train_textual_inversion.py"]\n')
    write(folder / "zz-mine.toml", "network_dim = 4\n")
    write(folder / "zz-broken.toml", "network_dim = = 4\n")
    assert run_cli(train_network.main, ["--list_presets", "--preset_dir", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == [*sorted(SHIPPED), "zz-broken", "zz-mine"]
    width = len("sd15-finetune-adafactor")
    shadowing = f"(user: {folder / 'sd15-ti.toml'}, shadows the shipped preset)"
    assert f"{'sd15-ti':<{width}}  my TI settings [train_textual_inversion.py] {shadowing}" in out
    assert f"{'zz-mine':<{width}}  (no description) (user: {folder / 'zz-mine.toml'})" in out
    assert out[-2].startswith(f"{'zz-broken':<{width}}  unreadable: ") and "not valid TOML" in out[-2]
    lora_8gb = read_preset(available_presets(preset_dirs())["sd15-lora-8gb"])
    assert f"{'sd15-lora-8gb':<{width}}  {lora_8gb.description} [train_network.py]" in out


def one_error_line(argv: list[str], capsys) -> str:
    assert run_cli(train_network.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_unknown_preset_name_lists_the_available_ones(capsys):
    line = one_error_line(["--preset", "sd15-lora-8g"], capsys)
    names = ", ".join(sorted(SHIPPED))
    assert line == f"error: --preset sd15-lora-8g: no such preset (did you mean 'sd15-lora-8gb'?); available: {names}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("network_dim = = 4\n", "{path}: not valid TOML"),
        ('description = "a\\nb"\n', "preset 'bad' ({path}): description must be one line of text"),
        ("token_string = 'x'\n", "preset 'bad' ({path}): 'token_string' is not a flag of this script"),
        ('scripts = ["train_textual_inversion.py"]\nnum_vectors_per_token = 2\n', "this preset is for train_textual"),
        ("network_dmi = 4\n", "'network_dmi' is not a flag of this script (did you mean 'network_dim'?)"),
        ("network_dim = -4\n", "{path}: network_dim"),
        ("config_file = 'x.toml'\n", "'config_file' cannot be set inside a preset"),
    ],
)
def test_a_bad_preset_is_one_line_naming_the_file(tmp_path, capsys, text, expected):
    path = write(tmp_path / "p" / "bad.toml", text)
    line = one_error_line(["--preset", "bad", "--preset_dir", str(path.parent)], capsys)
    assert expected.format(path=path) in line, line


def test_a_missing_preset_dir_is_one_line(tmp_path, capsys):
    line = one_error_line(["--preset", "x", "--preset_dir", str(tmp_path / "none")], capsys)
    assert line == f"error: --preset_dir {tmp_path / 'none'}: not a folder; create it or fix the path"


def test_docs_commands_parse():
    """The command lines in docs/presets.md that use a shipped preset parse with the real parsers."""
    docs = (SHIPPED_DIR.parent / "docs" / "presets.md").read_text()
    commands = [line.strip() for line in docs.splitlines() if line.strip().startswith("python ")]
    assert commands
    for command in commands:
        words = shlex.split(command)
        script = words[1]
        args = parse_args_with_config(parser_for(script), words[2:])
        assert args is None or args.preset
