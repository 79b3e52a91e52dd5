"""Typed, frozen settings read from parsed flags at a script's edge, so nothing below it sees argparse.

Each settings class is a frozen dataclass whose field names are flag names. Its field defaults are the flags'
defaults (``tests/test_settings_defaults.py`` checks they agree with every script's parser), and a field whose
flag a script does not have keeps that default: e.g. ``--no_token_padding`` exists in ``train_db.py`` only.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from_flags(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of the dataclass ``cls`` with each field taken from the flag of the same name where the
    script's parser defines it, else the field's default; ``overrides`` (values computed at the edge) win."""
    flags = vars(args)
    values = {f.name: flags[f.name] for f in fields(cls) if f.init and f.name in flags and f.name not in overrides}
    return cls(**values, **overrides)
