"""``--preset``: named, sparse TOML overlays of flags, applied beneath ``--config_file`` and the command line.

Precedence, lowest first: the parser's defaults, the presets (in the order given, later wins), the config file, the
command line. Shipped presets live in the repository's ``presets/`` folder; user presets in ``--preset_dir``, the
folder named by ``$SDTRAIN_PRESET_DIR`` and ``~/.config/sd-trainer/presets`` (searched in that order, before the
shipped ones, so a user preset shadows a shipped one of the same name). A preset file holds ``description`` (one
line), optionally ``scripts`` (the entry scripts it is for) and flags, at the top level or in ``[sections]``.
"""

from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.config.config_file import convert_value, flatten_sections, load_toml, shown_path
from library.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "presets"
ENV_VAR = "SDTRAIN_PRESET_DIR"
META_KEYS = ("description", "scripts")
KNOWN_SCRIPTS = frozenset(
    (
        "train_network.py",
        "train_db.py",
        "fine_tune.py",
        "train_textual_inversion.py",
        "train_textual_inversion_XTI.py",
        "sdxl_train_network.py",
        "sdxl_train.py",
        "sdxl_train_textual_inversion.py",
        "cache_latents.py",
    )
)
"""Entry scripts whose name (``parser.prog``) is checked against a preset's ``scripts``; run under another name
(a test, a notebook), only the keys are checked."""


@dataclass(frozen=True)
class PresetFile:
    """Where a preset name resolves to: the file, its origin (``shipped``/``user``/``file``) and what it shadows."""

    name: str
    path: Path
    origin: str
    shadows: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Preset:
    """A preset read and checked for shape (its flag values are checked against a parser later)."""

    source: PresetFile
    description: str
    scripts: tuple[str, ...]
    values: dict[str, Any]

    @property
    def label(self) -> str:
        """How messages name the preset: its name and file."""
        return f"preset '{self.source.name}' ({shown_path(self.source.path)})"


def user_preset_dir() -> Path:
    """The default user folder: ``$XDG_CONFIG_HOME/sd-trainer/presets``, else ``~/.config/sd-trainer/presets``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sd-trainer" / "presets"


def preset_dirs(preset_dir: str | None = None) -> list[tuple[Path, str]]:
    """The folders searched for presets with their origin, first wins: --preset_dir, $SDTRAIN_PRESET_DIR, the
    default user folder, the shipped presets."""
    dirs: list[tuple[Path, str]] = []
    if preset_dir:
        folder = Path(preset_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--preset_dir {preset_dir}: not a folder; create it or fix the path")
        dirs.append((folder, "user"))
    if os.environ.get(ENV_VAR):
        dirs.append((Path(os.environ[ENV_VAR]).expanduser(), "user"))
    dirs.append((user_preset_dir(), "user"))
    dirs.append((SHIPPED_DIR, "shipped"))
    return dirs


def available_presets(dirs: list[tuple[Path, str]]) -> dict[str, PresetFile]:
    """Every ``*.toml`` in ``dirs`` by name (the file's stem); the first folder holding a name wins."""
    found: dict[str, PresetFile] = {}
    hidden: dict[str, list[Path]] = {}
    for folder, origin in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            if path.stem in found:
                hidden.setdefault(path.stem, []).append(path)
            else:
                found[path.stem] = PresetFile(path.stem, path, origin)
    return {
        name: PresetFile(f.name, f.path, f.origin, tuple(hidden.get(name, ()))) for name, f in sorted(found.items())
    }


def find_preset(name: str, dirs: list[tuple[Path, str]]) -> PresetFile:
    """A preset by name, or by path when ``name`` ends with ``.toml`` or holds a folder separator."""
    if name.endswith(".toml") or "/" in name or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"--preset {name}: file not found; give a preset name (--list_presets) or a .toml path")
        return PresetFile(path.stem, path, "file")
    found = available_presets(dirs)
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    names = ", ".join(found) or "none"
    raise UserError(f"--preset {name}: no such preset{hint}; available: {names}")


def read_preset(source: PresetFile) -> Preset:
    """Read a preset file: TOML with a one-line ``description``, an optional ``scripts`` list and flags."""
    flat = flatten_sections(load_toml(source.path, f"--preset {source.name}"), source.path)
    where = f"preset '{source.name}' ({shown_path(source.path)})"
    description = flat.pop("description", "")
    if not isinstance(description, str) or "\n" in description:
        raise UserError(f"{where}: description must be one line of text")
    scripts = flat.pop("scripts", [])
    if isinstance(scripts, str):
        scripts = [scripts]
    if not isinstance(scripts, list) or not all(isinstance(s, str) for s in scripts):
        raise UserError(f'{where}: scripts must be a list of script names, e.g. scripts = ["train_network.py"]')
    for key in ("config_file", "output_config", "preset", "preset_dir", "list_presets"):
        if key in flat:
            raise UserError(f"{where}: '{key}' cannot be set inside a preset; pass it on the command line")
    return Preset(source, description, tuple(scripts), flat)


def preset_values(presets: list[Preset], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags the presets set, later presets winning, converted and checked as ``parser`` would; a key this
    script has no flag for, or a preset meant for other scripts, is an error naming the preset."""
    actions = {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}
    values: dict[str, Any] = {}
    for preset in presets:
        script = parser.prog
        if preset.scripts and script in KNOWN_SCRIPTS and script not in preset.scripts:
            raise UserError(
                f"{preset.label} is for {', '.join(preset.scripts)}, not {script}; "
                "pick a preset for this script (--list_presets)"
            )
        for key, value in preset.values.items():
            action = actions.get(key)
            if action is None:
                close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                meant = f"; this preset is for {', '.join(preset.scripts)}" if preset.scripts else ""
                raise UserError(f"{preset.label}: '{key}' is not a flag of this script{hint}{meant}")
            values[key] = convert_value(key, value, action, preset.source.path)
    return values


def load_presets(names: list[str], preset_dir: str | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flag values of the presets ``names`` (applied in order) for ``parser``."""
    dirs = preset_dirs(preset_dir)
    return preset_values([read_preset(find_preset(name, dirs)) for name in names], parser)


def list_presets_text(preset_dir: str | None) -> str:
    """``--list_presets``: one line per preset: name, description, the scripts it is for and, for user presets,
    the file (and whether it shadows a shipped preset); an unreadable file is listed with its error."""
    found = available_presets(preset_dirs(preset_dir))
    if not found:
        return "no presets found"
    width = max(len(name) for name in found)
    lines = []
    for name, source in found.items():
        try:
            preset = read_preset(source)
            about = preset.description or "(no description)"
            if preset.scripts:
                about += f" [{', '.join(preset.scripts)}]"
        except UserError as e:
            about = f"unreadable: {e}"
        if source.origin != "shipped":
            hidden = ["the shipped preset" if p.parent == SHIPPED_DIR else shown_path(p) for p in source.shadows]
            shadows = f", shadows {', '.join(hidden)}" if hidden else ""
            about += f" ({source.origin}: {shown_path(source.path)}{shadows})"
        lines.append(f"{name:<{width}}  {about}")
    return "\n".join(lines)
