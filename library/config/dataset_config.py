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
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import toml

from library.config.dataset_schema import (
    AUGMENT_RANGES,
    DATASET_FLAGS,
    DATASET_KEYS,
    RESOLUTION_RANGE,
    SUBSET_ASCENDING_KEYS,
    clip,
    validate_user_config,
)
from library.config.settings import settings_from_flags
from library.config.values import DATASET_RANGES
from library.dataset.buckets import BucketSettings, check_step, validate_settings
from library.dataset.scan import read_text_file
from library.dataset.types import PIXEL_AUGMENT_KEYS, DatasetConfig, SubsetConfig
from library.errors import UserError

logger = logging.getLogger("sdtrain.dataset")

_FOLDER_NAME = re.compile(r"^(\d+(?:\.\d+)?)_(.*)$")
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
    except (ValueError, OverflowError):
        raise UserError(f"--{flag}: expected {example}, got '{clip(text)}'") from None
    if len(parts) == 1:
        parts = (parts[0], parts[0])
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts):
        raise UserError(f"--{flag}: expected {example}, got '{clip(text)}'")
    return parts


@dataclasses.dataclass(frozen=True)
class DatasetFlags:
    """Every command-line flag the dataset code reads (where the data is, per-dataset/per-subset defaults, latent
    caching), read once at a script's edge so the dataset code never sees the argparse namespace."""

    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None
    conditioning_data_dir: str | None = None
    dataset_class: str | None = None
    cache_info: bool = False
    dataset_repeats: float = 1
    train_batch_size: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    caption_extension: str = ".caption"
    caption_extention: str | None = None  # sd-scripts' misspelt alias; wins over caption_extension when given
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: str | tuple[float, float] | None = None  # "MIN,MAX" as typed
    random_crop: bool = False
    resolution: str | tuple[int, int] | None = None  # "SIZE" or "WIDTH,HEIGHT" as typed
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    alpha_mask: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    resize_interpolation: str | None = None
    validation_seed: int | None = None
    validation_split: float = 0.0
    prior_loss_weight: float = 1.0
    masked_loss: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int | None = None
    skip_cache_check: bool = False
    debug_dataset: bool = False
    rotate_aug_max_angle: float = 0.0
    rotate_aug_fixed_angle: float = 0.0
    brightness_aug: float = 0.0
    brightness_aug_fixed: float = 0.0
    contrast_aug: float = 0.0
    contrast_aug_fixed: float = 0.0
    saturation_aug: float = 0.0
    saturation_aug_fixed: float = 0.0
    hue_aug: float = 0.0
    hue_aug_fixed: float = 0.0


def dataset_flags(args: argparse.Namespace, **overrides: Any) -> DatasetFlags:
    """The dataset flags of a parsed command line (flags a script lacks keep their defaults)."""
    return settings_from_flags(DatasetFlags, args, **overrides)


def flag_values(flags: DatasetFlags) -> dict[str, Any]:
    """The dataset flags as config keys (``train_batch_size`` -> ``batch_size``), parsed like sd-scripts does.

    Keys without a flag (``class_tokens``, ``custom_attributes``, ``network_multiplier``) are None here."""
    names = set(DATASET_KEYS) | set(SUBSET_ASCENDING_KEYS) | {"alpha_mask", "conditioning_data_dir"}
    given = dataclasses.asdict(flags)
    values = {key: given.get(DATASET_FLAGS.get(key, key)) for key in names}
    if flags.caption_extention is not None:
        values["caption_extension"] = flags.caption_extention
    if values["resolution"] is not None and not isinstance(values["resolution"], tuple):
        res = _parse_pair("resolution", values["resolution"], int, "'SIZE' or 'WIDTH,HEIGHT' such as 512 or 512,768")
        if not all(RESOLUTION_RANGE.low <= side <= RESOLUTION_RANGE.high for side in res):
            raise UserError(
                f"--resolution: sizes must be from 1 to {RESOLUTION_RANGE.high:g}, got '{clip(values['resolution'])}'"
            )
        values["resolution"] = res
    crop = values["face_crop_aug_range"]
    if crop is not None and not isinstance(crop, tuple):
        lo, hi = _parse_pair("face_crop_aug_range", crop, float, "two numbers 'MIN,MAX' such as 2.0,4.0")
        if lo > hi or lo <= 0:
            raise UserError(f"--face_crop_aug_range: MIN must be above 0 and not exceed MAX, got '{clip(crop)}'")
        values["face_crop_aug_range"] = (lo, hi)
    if values["caption_separator"] == "":
        raise UserError("--caption_separator: must not be empty (tags are split at it); leave it out to use ','")
    for key, rule in {**DATASET_RANGES, **AUGMENT_RANGES}.items():
        if key in values and values[key] is not None:
            flag = DATASET_FLAGS.get(key, key)
            try:
                rule.check(values[key])
            except (ValueError, OverflowError):
                raise UserError(f"--{flag}: must be {rule.describe()}, got {clip(values[key])}") from None
    return values


def _first_set(key: str, levels: Sequence[dict[str, Any]], default: Any) -> Any:
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return default


def _normalise_extension(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def _make_subset(
    name: str, own: dict[str, Any], levels: Sequence[dict[str, Any]], flags: dict, where: str | None = None
) -> SubsetConfig:
    """Build one SubsetConfig: ascending keys from ``own`` then ``levels`` then flags; subset-only keys from ``own``.

    ``--conditioning_data_dir`` is the fallback for DreamBooth-style subsets that do not set their own folder.
    ``where`` (default ``name``) starts error lines.
    """
    defaults = _defaults(SubsetConfig)
    values: dict[str, Any] = {}
    for key in SUBSET_ASCENDING_KEYS:
        values[key] = _first_set(key, [own, *levels, flags], defaults.get(key))
    where = where or name
    _resolve_balancing(values, _first_set("num_repeats", [own, *levels], None), own, where)
    for random_key, fixed_key in zip(PIXEL_AUGMENT_KEYS[::2], PIXEL_AUGMENT_KEYS[1::2]):
        if values[random_key] and values[fixed_key]:
            raise UserError(
                f"{where}: {random_key} ({values[random_key]:g}, random) and {fixed_key} ({values[fixed_key]:g}, "
                "always) are both set; keep one of them (set the other to 0)"
            )
    values["caption_extension"] = _normalise_extension(values["caption_extension"])
    values["custom_attributes"] = dict(values["custom_attributes"] or {})
    values["alpha_mask"] = bool(_first_set("alpha_mask", [own, flags], False))
    values["is_reg"] = bool(own.get("is_reg", False))
    values["is_val"] = bool(own.get("is_val", False))
    if values["is_reg"] and values["is_val"]:
        raise UserError(f"{where}: is_reg and is_val are both true; validation subsets cannot be regularization")
    values["recursive"] = bool(own.get("recursive", False))
    for key in ("image_dir", "metadata_file"):
        values[key] = Path(own[key]) if own.get(key) is not None else None
    conditioning = own.get("conditioning_data_dir")
    if conditioning is None and values["metadata_file"] is None:
        conditioning = flags.get("conditioning_data_dir")
    values["conditioning_data_dir"] = Path(conditioning) if conditioning is not None else None
    return SubsetConfig(name=name, **values)


def _resolve_balancing(values: dict[str, Any], repeats: float | None, own: dict[str, Any], where: str) -> None:
    """OneTrainer's ``balancing``/``balancing_strategy`` -> ``num_repeats`` ("repeats", an alias that must agree with
    a num_repeats given in the file) or ``samples_per_epoch`` ("samples": a whole number of samples per epoch)."""
    balancing, strategy = values.pop("balancing"), values.pop("balancing_strategy") or "repeats"
    if strategy == "samples":
        if balancing is None:
            raise UserError(f'{where}: balancing_strategy = "samples" needs balancing = N (samples per epoch)')
        if not float(balancing).is_integer():
            raise UserError(
                f'{where}: balancing must be a whole number of samples with balancing_strategy = "samples", '
                f"got {balancing:g}"
            )
        if own.get("num_repeats") is not None:
            raise UserError(
                f'{where}: num_repeats has no effect with balancing_strategy = "samples" (balancing = '
                f"{balancing:g} samples per epoch); remove one of them"
            )
        values["samples_per_epoch"], values["num_repeats"] = int(balancing), 1
    elif balancing is not None:
        if repeats is not None and float(repeats) != float(balancing):
            raise UserError(
                f"{where}: balancing {balancing:g} and num_repeats {repeats:g} disagree (with balancing_strategy "
                '"repeats", balancing is num_repeats); keep one of them'
            )
        try:
            values["num_repeats"] = DATASET_RANGES["num_repeats"].check(balancing)
        except ValueError:
            rule = DATASET_RANGES["num_repeats"].describe()
            raise UserError(f"{where}: balancing (repeats) must be {rule}, got {balancing:g}") from None


def _key_namer(own: dict[str, Any], general: dict[str, Any], flags: dict[str, Any]) -> Callable[[str], str]:
    """Names a dataset key as the user set it: the TOML key, the ``--flag``, or ``key (default)``."""

    def name(key: str) -> str:
        if own.get(key) is not None:
            return key
        if general.get(key) is not None:
            return f"[general] {key}"
        if flags.get(key) is not None:
            return f"--{DATASET_FLAGS.get(key, key)}"
        return f"{key} (default)"

    return name


def _make_dataset(
    name: str,
    where: str,
    style: str,
    own: dict[str, Any],
    general: dict[str, Any],
    flags: dict[str, Any],
    subsets: Sequence[SubsetConfig],
) -> DatasetConfig:
    """Build one DatasetConfig (keys from ``own`` -> ``general`` -> flags -> default); ``where`` prefixes errors.

    As sd-scripts, min/max_bucket_reso that are not multiples of bucket_reso_steps are rounded (min down, max up)
    with a warning; everything else that cannot make valid buckets is a UserError naming the key or flag.
    """
    defaults = _defaults(DatasetConfig)
    values = {key: _first_set(key, [own, general, flags], defaults[key]) for key in DATASET_KEYS}
    dataset = DatasetConfig(name=name, style=style, subsets=tuple(subsets), **values)  # type: ignore[arg-type]
    key_name = _key_namer(own, general, flags)
    if dataset.enable_bucket:
        step = dataset.bucket_reso_steps
        check_step(step, where, key_name("bucket_reso_steps"))
        low = dataset.min_bucket_reso - dataset.min_bucket_reso % step
        high = dataset.max_bucket_reso + (-dataset.max_bucket_reso) % step
        for key, old, new in (
            ("min_bucket_reso", dataset.min_bucket_reso, low),
            ("max_bucket_reso", dataset.max_bucket_reso, high),
        ):
            if old != new:
                logger.warning(
                    f"{where}: {key_name(key)} {old} is not a multiple of bucket_reso_steps {step}; using {new}"
                )
        dataset = dataclasses.replace(dataset, min_bucket_reso=max(step, low), max_bucket_reso=high)
        width, height = dataset.resolution
        if dataset.min_bucket_reso > min(width, height):
            raise UserError(
                f"{where}: {key_name('min_bucket_reso')} {dataset.min_bucket_reso} is larger than the resolution's "
                f"shorter side {min(width, height)}; lower min_bucket_reso or raise resolution"
            )
        if dataset.max_bucket_reso < max(width, height):
            raise UserError(
                f"{where}: {key_name('max_bucket_reso')} {dataset.max_bucket_reso} is smaller than the resolution's "
                f"longer side {max(width, height)}; raise max_bucket_reso or lower resolution"
            )
    validate_settings(BucketSettings.from_dataset(dataset), where)
    return dataset


def _check_style(style: str, allowed_styles: set[str], where: str) -> None:
    if style not in allowed_styles:
        wanted = " or ".join(_STYLE_WORDS[s] for s in sorted(allowed_styles))
        raise UserError(f"{where}: {_STYLE_WORDS[style]} are not supported by this script; it takes {wanted}")


def _is(path: Path, kind: str) -> bool:
    """``path.is_dir()``/``is_file()`` that treats a path the OS cannot even look up (too long, NUL byte) as absent."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except (OSError, ValueError):
        return False


def _path_problem(path: Path) -> str:
    """Why ``path`` cannot be found, in words (a name that is too long or has a NUL byte gets its own reason)."""
    text = str(path)
    if "\0" in text:
        return "contains a NUL character"
    if len(text) > 4096 or any(len(part) > 255 for part in path.parts):
        return "is too long for the file system (4096 characters in all, 255 per folder or file name)"
    return "does not exist"


def _check_paths(subset: SubsetConfig, where: str) -> None:
    """Each folder/file a subset names must exist (checked at start-up, not when the first batch is read)."""
    checks = [("image_dir", subset.image_dir, "dir"), ("conditioning_data_dir", subset.conditioning_data_dir, "dir")]
    checks.append(("metadata_file", subset.metadata_file, "file"))
    for key, path, kind in checks:
        if path is None:
            continue
        shown = clip(path)
        if key == "metadata_file" and path.suffix.lower() not in (".json", ".jsonl"):
            raise UserError(f"{where}: metadata_file '{shown}' must be a .json or .jsonl file")
        if not _is(path, kind):
            what = "folder" if kind == "dir" else "file"
            raise UserError(
                f"{where}: {key} '{shown}' {_path_problem(path)} or is not a {what} "
                "(relative paths are taken from the current directory)"
            )


def read_config_file(path: Path) -> dict:
    """Parse a .toml or .json dataset config; any problem reading or parsing it becomes a one-line UserError."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(
            f"--dataset_config {clip(path)}: unsupported file type '{clip(suffix)}'; use a .toml or .json file"
        )
    if not _is(path, "file"):
        raise UserError(f"--dataset_config {clip(path)}: file not found ({_path_problem(path)} or is not a file)")
    text = read_text_file(path, "--dataset_config file")
    if suffix == ".toml":
        try:
            return toml.loads(text)
        except toml.TomlDecodeError as e:
            raise UserError(f"{path}: TOML syntax error at line {e.lineno}, column {e.colno}: {clip(e.msg)}") from None
        except Exception as e:  # the toml library raises assorted errors (TypeError, IndexError, ...) on odd input
            raise UserError(
                f"{path}: not valid TOML ({clip(f'{type(e).__name__}: {e}')}); check the file's syntax"
            ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {clip(e.msg)}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(
            f"{path}: not valid JSON ({clip(f'{type(e).__name__}: {e}')}); check the file's syntax"
        ) from None


def configs_from_user_config(
    config: Any, source: str, dataset_flags: DatasetFlags, allowed_styles: set[str]
) -> list[DatasetConfig]:
    """Resolve a parsed dataset config (the TOML/JSON structure) against the command-line ``dataset_flags``."""
    checked = validate_user_config(config, source)
    flags = flag_values(dataset_flags)
    general = checked["general"]
    datasets = []
    for d_index, dataset in enumerate(checked["datasets"]):
        d_name = f"datasets[{d_index}]"
        _check_style(dataset["style"], allowed_styles, f"{source}: {d_name}")
        own = {k: v for k, v in dataset.items() if k not in ("subsets", "style")}
        subsets = []
        for s_index, subset_values in enumerate(dataset["subsets"]):
            s_name = f"{d_name}.subsets[{s_index}]"
            subset = _make_subset(s_name, subset_values, [own, general], flags, f"{source}: {s_name}")
            _check_paths(subset, f"{source}: {s_name}")
            subsets.append(subset)
        datasets.append(_make_dataset(d_name, f"{source}: {d_name}", dataset["style"], own, general, flags, subsets))
    return datasets


def _subfolders(base: Path, flag: str) -> list[Path]:
    """The visible subfolders of ``base``; a folder that cannot be listed is a UserError naming the flag."""
    if not _is(base, "dir"):
        raise UserError(f"--{flag} {clip(base)}: folder not found ({_path_problem(base)} or is not a folder)")
    try:
        return sorted(p for p in base.iterdir() if not p.name.startswith(".") and _is(p, "dir"))
    except OSError as e:
        raise UserError(f"--{flag} {clip(base)}: cannot list the folder ({e.strerror or type(e).__name__})") from None


def subsets_from_folders(base: Path, flag: str, is_reg: bool) -> list[dict[str, Any]]:
    """sd-scripts' folder convention: each immediate subfolder ``<repeats>_<class tokens>`` is one subset."""
    found = []
    rule = DATASET_RANGES["num_repeats"]
    for sub in _subfolders(base, flag):
        match = _FOLDER_NAME.match(sub.name)
        if match is None:
            logger.warning(f"--{flag}: ignoring folder '{clip(sub.name)}': its name does not start with '<repeats>_'")
            continue
        repeats = float(match.group(1))
        if repeats == 0:
            logger.warning(f"--{flag}: ignoring folder '{clip(sub.name)}': 0 repeats")
            continue
        try:
            rule.check(repeats)
        except ValueError:
            raise UserError(
                f"--{flag}: folder '{clip(sub.name)}': its repeat count must be {rule.describe()}; rename the folder"
            ) from None
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
            f"--{flag} {clip(base)}: no subfolders named '<repeats>_<class tokens>' found; put the images in a "
            f"subfolder such as '{clip(base / '10_sls frog')}' (10 repeats per epoch, class tokens 'sls frog')"
        )
    return found


def _configs_from_folders(
    dataset_flags: DatasetFlags, train_data_dir: str, allowed_styles: set[str]
) -> list[DatasetConfig]:
    _check_style("dreambooth", allowed_styles, "--train_data_dir")
    flags = flag_values(dataset_flags)
    found = subsets_from_folders(Path(train_data_dir), "train_data_dir", False)
    if dataset_flags.reg_data_dir is not None:
        found += subsets_from_folders(Path(dataset_flags.reg_data_dir), "reg_data_dir", True)
    subsets = [_make_subset(entry.pop("name"), entry, [], flags) for entry in found]
    for subset in subsets:
        _check_paths(subset, subset.name)
    return [_make_dataset("datasets[0]", "--train_data_dir", "dreambooth", {}, {}, flags, subsets)]


def _configs_from_in_json(dataset_flags: DatasetFlags, allowed_styles: set[str]) -> list[DatasetConfig]:
    _check_style("finetune", allowed_styles, "--in_json")
    flags = flag_values(dataset_flags)
    own = {"metadata_file": dataset_flags.in_json, "image_dir": dataset_flags.train_data_dir}
    subset = _make_subset("--in_json", own, [], flags)
    if subset.metadata_file is not None and not _is(subset.metadata_file, "file"):
        raise UserError(f"--in_json {clip(subset.metadata_file)}: file not found")
    if subset.image_dir is not None and not _is(subset.image_dir, "dir"):
        raise UserError(f"--train_data_dir {clip(subset.image_dir)}: folder not found")
    _check_paths(subset, "--in_json")
    return [_make_dataset("datasets[0]", "--in_json", "finetune", {}, {}, flags, [subset])]


def load_dataset_configs(flags: DatasetFlags, allowed_styles: set[str]) -> list[DatasetConfig]:
    """All datasets for a run, from ``--dataset_config``, else ``--in_json``, else ``--train_data_dir`` folders.

    ``allowed_styles`` holds "dreambooth" and/or "finetune": the dataset styles the calling script can train on.
    """
    if flags.dataset_config is not None:
        given = {"train_data_dir": flags.train_data_dir, "reg_data_dir": flags.reg_data_dir, "in_json": flags.in_json}
        ignored = [f"--{name}" for name, value in given.items() if value]
        if ignored:
            logger.warning(f"--dataset_config is given, so {', '.join(ignored)} are ignored")
        path = Path(flags.dataset_config)
        configs = configs_from_user_config(read_config_file(path), str(path), flags, allowed_styles)
    elif flags.in_json is not None:
        configs = _configs_from_in_json(flags, allowed_styles)
    elif flags.train_data_dir is not None:
        configs = _configs_from_folders(flags, flags.train_data_dir, allowed_styles)
    else:
        configs = []
    if flags.cache_info and any(d.style == "finetune" for d in configs):
        logger.warning(
            "--cache_info caches DreamBooth-style folders only (as in sd-scripts); fine-tuning datasets ignore it"
        )
    if configs:
        return configs
    if allowed_styles == {"finetune"}:
        raise UserError("no training data: pass --in_json METADATA.json (with --train_data_dir) or --dataset_config")
    raise UserError("no training data: pass --dataset_config FILE.toml or --train_data_dir DIR")
