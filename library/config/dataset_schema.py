"""The dataset config schema (sd-scripts' ``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``) and its checks.

Which key may appear where follows sd-scripts' ``config_util.ConfigSanitizer``. Values are checked with voluptuous,
but every problem is reported as one readable line naming the file, the place in the file and the key.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from typing import Any, NoReturn

import voluptuous as vol

from library.config.values import DATASET_RANGES, NON_NEGATIVE, Range
from library.dataset.buckets import MAX_SIDE
from library.errors import UserError

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
# Keys with no flag twin in DATASET_RANGES: their ranges live here.
RESOLUTION_RANGE = Range(int, 1, MAX_SIDE)
MULTIPLIER_RANGE = Range(float, -1e3, 1e3)
ECHO_LIMIT = 80  # longest echo of a user's value in an error line
# OneTrainer's rotation and colour jitter strengths (keys and flags share these); *_fixed ones may be negative.
_FACTOR, _FACTOR_FIXED = Range(float, 0.0, 10.0), Range(float, -1.0, 10.0)
AUGMENT_RANGES: dict[str, Range] = {
    "rotate_aug_max_angle": Range(float, 0.0, 180.0),
    "rotate_aug_fixed_angle": Range(float, -180.0, 180.0),
    "brightness_aug": _FACTOR,
    "brightness_aug_fixed": _FACTOR_FIXED,
    "contrast_aug": _FACTOR,
    "contrast_aug_fixed": _FACTOR_FIXED,
    "saturation_aug": _FACTOR,
    "saturation_aug_fixed": _FACTOR_FIXED,
    "hue_aug": Range(float, 0.0, 1.0),
    "hue_aug_fixed": Range(float, -1.0, 1.0),
}
BALANCING_RANGE = Range(float, 0.0, 1e9, low_open=True)
BALANCING_STRATEGIES = ("repeats", "samples")  # OneTrainer's REPEATS / SAMPLES


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid("must be true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid("must be a string")
    return value


def _separator(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise vol.Invalid("must be a non-empty string (tags are split at it)")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid("must be a string")
    if not value.strip() or "\0" in value:
        raise vol.Invalid("must be a path (not empty, no NUL character)")
    return value


def _table(value: Any) -> dict:
    if not isinstance(value, dict):
        raise vol.Invalid("must be a table of names and values")
    return dict(value)


def _ranged(key: str, rule: Range | None = None) -> Callable[[Any], int | float]:
    """A checker for numeric ``key``: its type (int or number, as sd-scripts' schema), then its one allowed range."""
    rule = rule or DATASET_RANGES[key]

    def check(value: Any) -> int | float:
        if not (_is_int(value) if rule.kind is int else _is_number(value)):
            raise vol.Invalid("must be an integer" if rule.kind is int else "must be a number")
        try:
            return rule.check(value)
        except (ValueError, OverflowError):
            raise vol.Invalid(f"must be {rule.describe()}") from None

    return check


def _resolution(value: Any) -> tuple[int, int]:
    pair = [value, value] if not isinstance(value, (list, tuple)) else list(value)
    if len(pair) == 2 and all(_is_int(v) and RESOLUTION_RANGE.low <= v <= RESOLUTION_RANGE.high for v in pair):
        return (pair[0], pair[1])
    raise vol.Invalid(f"must be a whole number from 1 to {RESOLUTION_RANGE.high:g} or [width, height] of such")


def _crop_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        if all(math.isfinite(v) and v > 0 for v in value) and value[0] <= value[1]:
            return (float(value[0]), float(value[1]))
    raise vol.Invalid("must be two positive numbers [min, max] with min <= max")


def _strategy(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in BALANCING_STRATEGIES:
        raise vol.Invalid('must be "repeats" or "samples"')
    return value.lower()


def _interpolation(value: Any) -> str:
    if not isinstance(value, str) or value not in RESIZE_INTERPOLATIONS:
        raise vol.Invalid("must be one of " + ", ".join(RESIZE_INTERPOLATIONS))
    return value


# Set in [[datasets]] or [general]; flag fallback through DATASET_FLAGS.
DATASET_KEYS: dict[str, Callable[[Any], Any]] = {
    "batch_size": _ranged("batch_size"),
    "resolution": _resolution,
    "enable_bucket": _boolean,
    "min_bucket_reso": _ranged("min_bucket_reso"),
    "max_bucket_reso": _ranged("max_bucket_reso"),
    "bucket_reso_steps": _ranged("bucket_reso_steps"),
    "bucket_no_upscale": _boolean,
    "network_multiplier": _ranged("network_multiplier", MULTIPLIER_RANGE),
    "validation_seed": _ranged("validation_seed"),
    "validation_split": _ranged("validation_split"),
    "resize_interpolation": _interpolation,
}

# Set in [[datasets.subsets]], [[datasets]] or [general] ("ascending" keys).
SUBSET_ASCENDING_KEYS: dict[str, Callable[[Any], Any]] = {
    "num_repeats": _ranged("num_repeats"),
    "shuffle_caption": _boolean,
    "caption_separator": _separator,
    "keep_tokens": _ranged("keep_tokens"),
    "keep_tokens_separator": _string,
    "secondary_separator": _string,
    "enable_wildcard": _boolean,
    "caption_prefix": _string,
    "caption_suffix": _string,
    "color_aug": _boolean,
    "flip_aug": _boolean,
    "face_crop_aug_range": _crop_range,
    "random_crop": _boolean,
    "token_warmup_min": _ranged("token_warmup_min"),
    "token_warmup_step": _ranged("token_warmup_step"),
    "caption_dropout_rate": _ranged("caption_dropout_rate"),
    "caption_dropout_every_n_epochs": _ranged("caption_dropout_every_n_epochs"),
    "caption_tag_dropout_rate": _ranged("caption_tag_dropout_rate"),
    "custom_attributes": _table,
    "caption_extension": _string,
    "class_tokens": _string,
    "cache_info": _boolean,
    **{key: _ranged(key, rule) for key, rule in AUGMENT_RANGES.items()},
    "loss_weight": _ranged("loss_weight", NON_NEGATIVE),
    "balancing": _ranged("balancing", BALANCING_RANGE),
    "balancing_strategy": _strategy,
}

# Only in [[datasets.subsets]].
SUBSET_ONLY_KEYS: dict[str, Callable[[Any], Any]] = {
    "image_dir": _path,
    "is_reg": _boolean,
    "is_val": _boolean,
    "alpha_mask": _boolean,
    "metadata_file": _path,
    "conditioning_data_dir": _path,
    "recursive": _boolean,
}

# Meaningful only for DreamBooth-style subsets (sd-scripts rejects them in fine-tuning datasets).
DREAMBOOTH_ONLY_KEYS = ("is_reg", "class_tokens", "caption_extension", "cache_info", "conditioning_data_dir")

# Command-line flag that backs a config key when its name differs.
DATASET_FLAGS = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

ALL_KEYS = (*DATASET_KEYS, *SUBSET_ASCENDING_KEYS, *SUBSET_ONLY_KEYS, "general", "datasets", "subsets")

_TYPE_WORDS = {
    "must be an integer": "an integer",
    "must be a number": "a number",
    "must be true or false": "true or false",
    "must be a string": "a string",
}


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` made safe for a one-line message: control characters escaped, cut to ``limit`` characters."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    safe = safe.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def shown(key: Any) -> str:
    """A key from the user's file, quoted and clipped for an error line."""
    return "'" + clip(key, 40) + "'"


def describe(value: Any) -> str:
    """A value as the user wrote it in the file (JSON spelling: strings quoted, true/false), clipped to one line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return clip(text)


class _Checker:
    """Checks one parsed config and raises UserError at the first problem, naming ``source`` and the location."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, location: str, message: str) -> NoReturn:
        where = f"{self.source}: {location}: " if location else f"{self.source}: "
        raise UserError(where + message)

    def unknown_key(self, location: str, key: str, level: str) -> NoReturn:
        if key in SUBSET_ONLY_KEYS and level != "subset":
            self.fail(
                location, f"key {shown(key)} belongs in a [[datasets.subsets]] entry, not in {_LEVEL_NAMES[level]}"
            )
        if key in DATASET_KEYS and level == "subset":
            self.fail(
                location, f"key {shown(key)} is a dataset setting; move it to its [[datasets]] entry or to [general]"
            )
        if key == "subsets" and level == "general":
            self.fail(location, "[general] cannot hold subsets; put [[datasets.subsets]] under a [[datasets]] entry")
        match = difflib.get_close_matches(str(key)[:100], ALL_KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else "; see docs for the keys allowed here"
        self.fail(location, f"unknown key {shown(key)}{hint}")

    def values(self, node: dict, schema: dict[str, Callable[[Any], Any]], location: str) -> dict:
        """Validate the values of ``node`` (all keys already known) and return them converted (tuples etc.)."""
        validator = vol.Schema({vol.Optional(k): v for k, v in schema.items()}, extra=vol.PREVENT_EXTRA)
        try:
            return dict(validator(node))
        except vol.MultipleInvalid as e:
            first = min(e.errors, key=lambda err: list(node).index(err.path[0]) if err.path else -1)
            key = first.path[0] if first.path else "?"
            message = first.error_message
            got = describe(node.get(key))
            if message in _TYPE_WORDS:
                self.fail(location, f"key {shown(key)} must be {_TYPE_WORDS[message]}, got {got}")
            self.fail(location, f"key {shown(key)} {message}, got {got}")

    def table(self, value: Any, location: str, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(location, f"{what} must be a table, got {describe(value)}")
        return value

    def table_list(self, value: Any, location: str, what: str) -> list:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(location, f"'{what}' must be a list of tables ([[{what}]] in TOML), got {describe(value)}")
        return value


_LEVEL_NAMES = {"general": "[general]", "dataset": "a [[datasets]] entry", "subset": "a subset"}


def _dataset_style(subsets: list[dict], location: str, checker: _Checker) -> str:
    """All subsets with metadata_file: "finetune"; none: "dreambooth"; a mix is an error (as in sd-scripts)."""
    with_metadata = [i for i, s in enumerate(subsets) if "metadata_file" in s]
    if not with_metadata:
        return "dreambooth"
    if len(with_metadata) == len(subsets):
        return "finetune"
    without = [i for i in range(len(subsets)) if i not in with_metadata]
    checker.fail(
        location,
        f"subsets {with_metadata} use metadata_file (fine-tuning style) but subsets {without} do not (DreamBooth "
        "style); one dataset cannot mix the two, so split them into separate [[datasets]] entries",
    )


def _check_level(checker: _Checker, node: dict, allowed: dict, location: str, level: str) -> dict:
    for key in node:
        if key not in allowed:
            checker.unknown_key(location, key, level)
    return checker.values(node, allowed, location)


def validate_user_config(config: Any, source: str) -> dict:
    """Check a parsed dataset config and return it with values converted.

    Returns ``{"general": {...}, "datasets": [{**dataset_keys, "style": str, "subsets": [{...}, ...]}, ...]}``.
    Raises UserError (naming ``source`` and e.g. ``datasets[0].subsets[1]``) for the first problem found.
    """
    checker = _Checker(source)
    checker.table(config, "", "the file")
    for key in config:
        if key not in ("general", "datasets"):
            if key in DATASET_KEYS or key in SUBSET_ASCENDING_KEYS:
                checker.fail(
                    "", f"key {shown(key)} must be inside [general] or a [[datasets]] entry, not at the top level"
                )
            match = difflib.get_close_matches(str(key)[:100], ("general", "datasets"), n=1, cutoff=0.6)
            hint = f" (did you mean '{match[0]}'?)" if match else "; only [general] and [[datasets]] are allowed"
            checker.fail("", f"unknown top-level key {shown(key)}{hint}")

    general_schema = {**DATASET_KEYS, **SUBSET_ASCENDING_KEYS}
    general = _check_level(
        checker, checker.table(config.get("general", {}), "general", "[general]"), general_schema, "general", "general"
    )
    datasets_raw = checker.table_list(config.get("datasets", []), "", "datasets")
    if not datasets_raw:
        checker.fail("", "no [[datasets]] entry; add one with at least one [[datasets.subsets]] (image_dir = ...)")

    datasets = []
    for d_index, dataset in enumerate(datasets_raw):
        d_loc = f"datasets[{d_index}]"
        subsets_raw = checker.table_list(dataset.get("subsets", []), d_loc, "datasets.subsets")
        if not subsets_raw:
            checker.fail(d_loc, 'has no [[datasets.subsets]]; add one with image_dir = "<folder of images>"')
        style = _dataset_style(subsets_raw, d_loc, checker)
        dataset_schema = {**DATASET_KEYS, **SUBSET_ASCENDING_KEYS}
        if style == "finetune":
            dataset_schema = {k: v for k, v in dataset_schema.items() if k not in DREAMBOOTH_ONLY_KEYS}
        for key in dataset:
            if key in DREAMBOOTH_ONLY_KEYS and style == "finetune":
                checker.fail(
                    d_loc, f"key {shown(key)} is only for DreamBooth-style datasets (subsets without metadata_file)"
                )
        resolved = _check_level(
            checker, {k: v for k, v in dataset.items() if k != "subsets"}, dataset_schema, d_loc, "dataset"
        )
        subsets = []
        for s_index, subset in enumerate(subsets_raw):
            s_loc = f"{d_loc}.subsets[{s_index}]"
            subset_schema = {**SUBSET_ASCENDING_KEYS, **SUBSET_ONLY_KEYS}
            if style == "finetune":
                for key in subset:
                    if key in DREAMBOOTH_ONLY_KEYS:
                        checker.fail(
                            s_loc,
                            f"key {shown(key)} is only for DreamBooth-style subsets (image_dir without metadata_file)",
                        )
            elif "image_dir" not in subset:
                checker.fail(s_loc, "missing required key 'image_dir' (the folder holding this subset's images)")
            subsets.append(_check_level(checker, subset, subset_schema, s_loc, "subset"))
        datasets.append({**resolved, "style": style, "subsets": subsets})
    return {"general": general, "datasets": datasets}
