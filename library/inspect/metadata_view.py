"""The ``__metadata__`` of a safetensors file made readable: sd-scripts' ``ss_*`` training keys, A1111's ``sshs_*``
hashes, ``modelspec.*`` and anything else, each group sorted, JSON values pretty-printed and the bulky ones (tag
frequencies, thumbnails) summarised with their size unless asked for in full."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

GROUPS = (
    ("training (ss_*)", "ss_"),
    ("hashes (sshs_*)", "sshs_"),
    ("modelspec (modelspec.*)", "modelspec."),
    ("other", ""),
)
LONG_VALUE_CHARS = 1000
TOP_TAGS = 5
INDENT = "    "


def parse_value(value: str) -> Any:
    """A metadata string as data: JSON objects and arrays parsed, everything else (numbers, ``True``, ``None``,
    plain text: sd-scripts writes ``str()`` of Python values) kept as the exact string."""
    if value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parsed_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """All keys sorted, values through :func:`parse_value` (what ``--json`` prints)."""
    return {key: parse_value(metadata[key]) for key in sorted(metadata)}


def group_of(key: str) -> str:
    """The display group (a ``GROUPS`` title) of a metadata key, by its prefix."""
    return next(title for title, prefix in GROUPS if key.startswith(prefix))


def tag_frequency_summary(frequency: Any, chars: int) -> str:
    """One line for ``ss_tag_frequency`` (folder -> tag -> count): folders, distinct tags, size, most frequent."""
    if not isinstance(frequency, dict) or not all(isinstance(v, dict) for v in frequency.values()):
        return f"{chars} chars (not the usual folder -> tag -> count mapping; --full shows it)"
    totals: Counter[str] = Counter()
    for tags in frequency.values():
        totals.update({tag: int(n) for tag, n in tags.items() if isinstance(n, (int, float))})
    top = ", ".join(f"{tag} ({n})" for tag, n in totals.most_common(TOP_TAGS))
    line = f"{len(frequency)} folder(s), {len(totals)} distinct tag(s), {chars} chars (--full shows them)"
    return f"{line}; most frequent: {top}" if top else line


def _shorten_datasets(datasets: Any) -> Any:
    """``ss_datasets`` with each dataset's embedded tag frequency replaced by its one-line summary."""
    if not isinstance(datasets, list):
        return datasets
    out = []
    for entry in datasets:
        if isinstance(entry, dict) and entry.get("tag_frequency"):
            freq = entry["tag_frequency"]
            entry = {**entry, "tag_frequency": tag_frequency_summary(freq, len(json.dumps(freq)))}
        out.append(entry)
    return out


def _block(text: str) -> list[str]:
    return [INDENT + line for line in text.splitlines()]


def value_lines(key: str, raw: str, full: bool) -> list[str]:
    """The display lines of one key: ``  key: value`` for short scalars, the key then an indented block for JSON and
    multi-line text; long values summarised unless ``full``."""
    value = parse_value(raw)
    if not full and key == "ss_tag_frequency":
        return [f"  {key}: {tag_frequency_summary(value, len(raw))}"]
    if not full and key == "ss_datasets":
        value = _shorten_datasets(value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, ensure_ascii=False)
        if not full and key != "ss_datasets" and len(raw) > LONG_VALUE_CHARS:
            kind = f"JSON object with {len(value)} key(s)" if isinstance(value, dict) else f"JSON list of {len(value)}"
            return [f"  {key}: {kind}, {len(raw)} chars (--full shows it)"]
        return [f"  {key}:", *_block(text)]
    if not full and len(raw) > LONG_VALUE_CHARS:
        return [f"  {key}: {raw[:60]}… ({len(raw)} chars; --full shows it)"]
    if "\n" in raw:
        return [f"  {key}:", *_block(raw)]
    return [f"  {key}: {raw}"]


def metadata_lines(metadata: Mapping[str, str], full: bool = False) -> list[str]:
    """Every key under its group heading (groups in a fixed order, keys sorted within each)."""
    lines: list[str] = []
    for title, _ in GROUPS:
        keys = sorted(k for k in metadata if group_of(k) == title)
        if not keys:
            continue
        lines.append(f"{title}: {len(keys)} key(s)")
        for key in keys:
            lines.extend(value_lines(key, metadata[key], full))
    return lines
