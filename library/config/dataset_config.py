"""Turn ``--dataset_config`` (TOML/JSON), ``--train_data_dir``/``--reg_data_dir`` folders or ``--in_json`` into
resolved DatasetConfigs.

Every setting is looked up in order subset -> dataset -> [general] -> command-line flag -> default, and the first value
that is set wins (sd-scripts' BlueprintGenerator semantics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from library.config.dataset_schema import (
    DATASET_FLAGS,
    DATASET_KEYS,
    SUBSET_ASCENDING_KEYS,
    validate_user_config,
)
from library.dataset.types import DatasetConfig, SubsetConfig
from library.errors import UserError

logger = logging.getLogger("sdtrain.dataset")

_FOLDER_NAME = re.compile(r"^(\d+(?:\.\d+)?)_(.*)$")
_BUCKET_FLAGS = "--resolution / --min_bucket_reso / --max_bucket_reso"
_STYLE_WORDS = {
    "dreambooth": "DreamBooth-style datasets (subsets with image_dir, or --train_data_dir folders)",
    "finetune": "fine-tuning datasets (subsets with metadata_file, or --in_json)",
}


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _parse_pair(flag: str, text: str, kind: type, example: str) -> tuple:
    try:
        parts = tuple(kind(p) for p in str(text).split(","))
    except ValueError:
        raise UserError(f"--{flag}: expected {example}, got '{text}'") from None
    if len(parts) == 1:
        parts = (parts[0], parts[0])
    if len(parts) != 2:
        raise UserError(f"--{flag}: expected {example}, got '{text}'")
    return parts


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset flags as config keys (``train_batch_size`` -> ``batch_size``), parsed like sd-scripts does."""
    names = set(DATASET_KEYS) | set(SUBSET_ASCENDING_KEYS) | {"alpha_mask"}
    values = {key: getattr(args, DATASET_FLAGS.get(key, key), None) for key in names}
    if getattr(args, "caption_extention", None) is not None:
        values["caption_extension"] = args.caption_extention
    if values["resolution"] is not None and not isinstance(values["resolution"], tuple):
        res = _parse_pair("resolution", values["resolution"], int, "'SIZE' or 'WIDTH,HEIGHT' such as 512 or 512,768")
        if min(res) <= 0:
            raise UserError(f"--resolution: sizes must be positive, got '{values['resolution']}'")
        values["resolution"] = res
    crop = values["face_crop_aug_range"]
    if crop is not None and not isinstance(crop, tuple):
        lo, hi = _parse_pair("face_crop_aug_range", crop, float, "two numbers 'MIN,MAX' such as 2.0,4.0")
        if lo > hi:
            raise UserError(f"--face_crop_aug_range: MIN must not exceed MAX, got '{crop}'")
        values["face_crop_aug_range"] = (lo, hi)
    repeats = values["num_repeats"]
    if repeats is not None and repeats < 0:
        raise UserError(f"--dataset_repeats: must be 0 or more, got {repeats}")
    return values


def _first_set(key: str, levels: Sequence[dict[str, Any]], default: Any) -> Any:
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return default


def _normalise_extension(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def _make_subset(name: str, own: dict[str, Any], levels: Sequence[dict[str, Any]], flags: dict) -> SubsetConfig:
    """Build one SubsetConfig: ascending keys from ``own`` then ``levels`` then flags; subset-only keys from ``own``."""
    defaults = _defaults(SubsetConfig)
    values: dict[str, Any] = {}
    for key in SUBSET_ASCENDING_KEYS:
        values[key] = _first_set(key, [own, *levels, flags], defaults[key])
    values["caption_extension"] = _normalise_extension(values["caption_extension"])
    values["custom_attributes"] = dict(values["custom_attributes"] or {})
    values["alpha_mask"] = bool(_first_set("alpha_mask", [own, flags], False))
    values["is_reg"] = bool(own.get("is_reg", False))
    for key in ("image_dir", "metadata_file"):
        values[key] = Path(own[key]) if own.get(key) is not None else None
    return SubsetConfig(name=name, **values)


def _make_dataset(
    name: str,
    where: str,
    style: str,
    own: dict[str, Any],
    general: dict[str, Any],
    flags: dict[str, Any],
    subsets: Sequence[SubsetConfig],
) -> DatasetConfig:
    """Build one DatasetConfig (keys from ``own`` -> ``general`` -> flags -> default); ``where`` prefixes errors."""
    defaults = _defaults(DatasetConfig)
    values = {key: _first_set(key, [own, general, flags], defaults[key]) for key in DATASET_KEYS}
    dataset = DatasetConfig(name=name, style=style, subsets=tuple(subsets), **values)  # type: ignore[arg-type]
    if dataset.enable_bucket:
        width, height = dataset.resolution
        if dataset.min_bucket_reso > min(width, height):
            raise UserError(
                f"{where}: min_bucket_reso {dataset.min_bucket_reso} is larger than the resolution's shorter side "
                f"{min(width, height)}; lower min_bucket_reso or raise resolution"
            )
        if dataset.max_bucket_reso < max(width, height):
            raise UserError(
                f"{where}: max_bucket_reso {dataset.max_bucket_reso} is smaller than the resolution's longer side "
                f"{max(width, height)}; raise max_bucket_reso or lower resolution"
            )
    return dataset


def _check_style(style: str, allowed_styles: set[str], where: str) -> None:
    if style not in allowed_styles:
        wanted = " or ".join(_STYLE_WORDS[s] for s in sorted(allowed_styles))
        raise UserError(f"{where}: {_STYLE_WORDS[style]} are not supported by this script; it takes {wanted}")


def _check_paths(subset: SubsetConfig, where: str) -> None:
    if subset.image_dir is not None and not subset.image_dir.is_dir():
        raise UserError(
            f"{where}: image_dir '{subset.image_dir}' does not exist or is not a folder "
            "(relative paths are taken from the current directory)"
        )
    if subset.metadata_file is not None:
        if subset.metadata_file.suffix.lower() not in (".json", ".jsonl"):
            raise UserError(f"{where}: metadata_file '{subset.metadata_file}' must be a .json or .jsonl file")
        if not subset.metadata_file.is_file():
            raise UserError(f"{where}: metadata_file '{subset.metadata_file}' does not exist")


def read_config_file(path: Path) -> dict:
    """Parse a .toml or .json dataset config; syntax errors become a UserError with line and column."""
    if not path.is_file():
        raise UserError(f"--dataset_config {path}: file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            return toml.loads(text)
        except toml.TomlDecodeError as e:
            raise UserError(f"{path}: TOML syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    raise UserError(f"--dataset_config {path}: unsupported file type '{suffix}'; use a .toml or .json file")


def configs_from_user_config(
    config: Any, source: str, args: argparse.Namespace, allowed_styles: set[str]
) -> list[DatasetConfig]:
    """Resolve a parsed dataset config (the TOML/JSON structure) against the flags in ``args``."""
    checked = validate_user_config(config, source)
    flags = flag_values(args)
    general = checked["general"]
    datasets = []
    for d_index, dataset in enumerate(checked["datasets"]):
        d_name = f"datasets[{d_index}]"
        _check_style(dataset["style"], allowed_styles, f"{source}: {d_name}")
        own = {k: v for k, v in dataset.items() if k not in ("subsets", "style")}
        subsets = []
        for s_index, subset_values in enumerate(dataset["subsets"]):
            s_name = f"{d_name}.subsets[{s_index}]"
            subset = _make_subset(s_name, subset_values, [own, general], flags)
            _check_paths(subset, f"{source}: {s_name}")
            subsets.append(subset)
        datasets.append(_make_dataset(d_name, f"{source}: {d_name}", dataset["style"], own, general, flags, subsets))
    return datasets


def subsets_from_folders(base: Path, flag: str, is_reg: bool) -> list[dict[str, Any]]:
    """sd-scripts' folder convention: each immediate subfolder ``<repeats>_<class tokens>`` is one subset."""
    if not base.is_dir():
        raise UserError(f"--{flag} {base}: folder not found")
    found = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _FOLDER_NAME.match(sub.name)
        if match is None:
            logger.warning(f"--{flag}: ignoring folder '{sub.name}': its name does not start with '<repeats>_'")
            continue
        repeats = float(match.group(1))
        if repeats == 0:
            logger.warning(f"--{flag}: ignoring folder '{sub.name}': 0 repeats")
            continue
        found.append(
            {
                "name": f"--{flag} {sub.name}",
                "image_dir": str(sub),
                "num_repeats": int(repeats) if repeats.is_integer() else repeats,
                "class_tokens": match.group(2) or None,
                "is_reg": is_reg,
            }
        )
    if not found:
        raise UserError(
            f"--{flag} {base}: no subfolders named '<repeats>_<class tokens>' found; put the images in a subfolder "
            f"such as '{base / '10_sls frog'}' (10 repeats per epoch, class tokens 'sls frog')"
        )
    return found


def _configs_from_folders(args: argparse.Namespace, allowed_styles: set[str]) -> list[DatasetConfig]:
    _check_style("dreambooth", allowed_styles, "--train_data_dir")
    flags = flag_values(args)
    found = subsets_from_folders(Path(args.train_data_dir), "train_data_dir", False)
    if getattr(args, "reg_data_dir", None) is not None:
        found += subsets_from_folders(Path(args.reg_data_dir), "reg_data_dir", True)
    subsets = [_make_subset(entry.pop("name"), entry, [], flags) for entry in found]
    return [_make_dataset("datasets[0]", _BUCKET_FLAGS, "dreambooth", {}, {}, flags, subsets)]


def _configs_from_in_json(args: argparse.Namespace, allowed_styles: set[str]) -> list[DatasetConfig]:
    _check_style("finetune", allowed_styles, "--in_json")
    flags = flag_values(args)
    own = {"metadata_file": args.in_json, "image_dir": getattr(args, "train_data_dir", None)}
    subset = _make_subset("--in_json", own, [], flags)
    if subset.metadata_file is not None and not subset.metadata_file.is_file():
        raise UserError(f"--in_json {subset.metadata_file}: file not found")
    if subset.image_dir is not None and not subset.image_dir.is_dir():
        raise UserError(f"--train_data_dir {subset.image_dir}: folder not found")
    _check_paths(subset, "--in_json")
    return [_make_dataset("datasets[0]", _BUCKET_FLAGS, "finetune", {}, {}, flags, [subset])]


def load_dataset_configs(args: argparse.Namespace, allowed_styles: set[str]) -> list[DatasetConfig]:
    """All datasets for a run, from ``--dataset_config``, else ``--in_json``, else ``--train_data_dir`` folders.

    ``allowed_styles`` holds "dreambooth" and/or "finetune": the dataset styles the calling script can train on.
    """
    config_path = getattr(args, "dataset_config", None)
    if config_path is not None:
        ignored = [f"--{f}" for f in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, f, None)]
        if ignored:
            logger.warning(f"--dataset_config is given, so {', '.join(ignored)} are ignored")
        path = Path(config_path)
        return configs_from_user_config(read_config_file(path), str(path), args, allowed_styles)
    if getattr(args, "in_json", None) is not None:
        return _configs_from_in_json(args, allowed_styles)
    if getattr(args, "train_data_dir", None) is not None:
        return _configs_from_folders(args, allowed_styles)
    if allowed_styles == {"finetune"}:
        raise UserError("no training data: pass --in_json METADATA.json (with --train_data_dir) or --dataset_config")
    raise UserError("no training data: pass --dataset_config FILE.toml or --train_data_dir DIR")
