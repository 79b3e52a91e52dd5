"""Each typed settings class built with ``settings_from_flags`` has the defaults of the flags it reads.

A field whose flag a script lacks keeps the field's default, so that default must be the flag's default wherever
the flag exists; otherwise a script would behave differently depending on whether it defines the flag. The classes
are found in the source (every ``settings_from_flags(Name, …)`` call), so a new one is checked without listing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import re
from pathlib import Path

import pytest

from library.config.settings import settings_from_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "train_network",
    "train_db",
    "fine_tune",
    "train_textual_inversion",
    "sdxl_train_network",
    "sdxl_train",
    "sdxl_train_textual_inversion",
]
CALL = re.compile(r"settings_from_flags\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")


def settings_classes() -> list[type]:
    found: dict[str, type] = {}
    for path in sorted([*ROOT.glob("library/**/*.py"), *ROOT.glob("networks/*.py"), *ROOT.glob("*.py")]):
        text = path.read_text(encoding="utf-8")
        names = set(CALL.findall(text))
        if not names:
            continue
        module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(module_name)
        for name in names:
            if name == "cls":
                continue
            cls = getattr(module, name)
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


@functools.cache
def parser_defaults(script: str) -> dict[str, object]:
    parser = importlib.import_module(script).setup_parser()
    return {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}


def test_settings_classes_are_found():
    assert len(settings_classes()) >= 1


def script_specific(name: str) -> bool:
    """A flag every script defines, with defaults that differ between scripts (``--save_model_as``): no field
    default can equal them all, and none is ever used, since each script passes its own."""
    defaults = [parser_defaults(script) for script in SCRIPTS]
    return all(name in d for d in defaults) and len({repr(d[name]) for d in defaults}) > 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_field_defaults_equal_flag_defaults(script):
    defaults = parser_defaults(script)
    wrong = []
    for cls in settings_classes():
        for f in dataclasses.fields(cls):
            if f.name not in defaults or not f.init or script_specific(f.name):
                continue
            if f.default is not dataclasses.MISSING:
                field_default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                field_default = f.default_factory()
            else:
                continue
            flag_default = defaults[f.name]
            if field_default != flag_default and not (field_default is False and flag_default is None):
                wrong.append(f"{cls.__name__}.{f.name}: field {field_default!r}, --{f.name} {flag_default!r}")
    assert wrong == []


def test_script_specific_defaults_are_few():
    """Only flags whose default is the script's own (its saved format) may differ between scripts."""
    names = set.union(*(set(parser_defaults(script)) for script in SCRIPTS))
    assert sorted(n for n in names if script_specific(n)) == ["save_model_as"]


def test_absent_flags_take_field_defaults_and_overrides_win():
    @dataclasses.dataclass(frozen=True)
    class Example:
        present: int = 1
        absent: str = "x"
        computed: int = 0

    args = argparse.Namespace(present=5, unrelated=True)
    assert settings_from_flags(Example, args, computed=3) == Example(present=5, absent="x", computed=3)
