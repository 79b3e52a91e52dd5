"""Mutation fuzzing of the dataset config loader: every mutated TOML/JSON config (and metadata file) must be accepted
or refused with a one-line UserError, never any other exception.

A seeded generator mutates valid configs (our example and configs shaped like sd-scripts' documented examples) at
the byte level (flips, truncation, garbage, other encodings, duplicated/deleted lines) and at the structure level
(type swaps, inf/nan/huge numbers, long/odd paths, deleted/duplicated/misspelt keys, deep nesting). Run
``python -m tests.test_dataset_fuzz 10000`` for a long run; it prints the outcome counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import toml

from library.config.dataset_config import dataset_flags, load_dataset_configs
from library.config.flags import add_dataset_arguments
from library.dataset.loader import TrainDataset
from library.dataset.scan import scan_dataset
from library.errors import UserError
from tests.images import write_image

BOTH = {"dreambooth", "finetune"}
ODD_NUMBERS = [float("inf"), float("-inf"), float("nan"), 1e12, 1e308, -1, 0, 2**70, 10**400, 0.5, -0.0, 3]
ODD_STRINGS = ["", ".", "\x00", "a\nb", "é" * 300, "x" * 5000, "a/" * 400, "/dev/null", "\ud800", "{}", "[[x]]"]
KEYS = ["num_repeats", "dataset_repeats", "batch_size", "resolution", "enable_bucket", "bucket_reso_steps",
        "min_bucket_reso", "max_bucket_reso", "keep_tokens", "caption_extension", "image_dir", "metadata_file",
        "conditioning_data_dir", "caption_dropout_rate", "face_crop_aug_range", "token_warmup_step", "is_reg",
        "custom_attributes", "validation_seed", "network_multiplier", "subsets", "datasets", "general"]  # fmt: skip


def make_world(root: Path) -> dict[str, str]:
    """Folders and files the seed configs point at: images with captions, masks, metadata."""
    for name in ("a", "b"):
        write_image(root / "img" / f"{name}.png", (48, 32))
        (root / "img" / f"{name}.txt").write_text(f"{name} frog, green")
        write_image(root / "cond" / f"{name}.png", (48, 32))
    write_image(root / "reg" / "r.png", (32, 32))
    (root / "meta.json").write_text(json.dumps({str(root / "img" / "a.png"): {"caption": "a frog", "tags": "x, y"}}))
    return {
        "img": str(root / "img"),
        "reg": str(root / "reg"),
        "cond": str(root / "cond"),
        "meta": str(root / "meta.json"),
    }


def seed_configs(paths: dict[str, str]) -> list[dict[str, Any]]:
    """Valid configs: our example's shape and the shapes of sd-scripts' documented examples."""
    return [
        {
            "general": {"keep_tokens": 2, "shuffle_caption": True},
            "datasets": [
                {
                    "resolution": 96,
                    "batch_size": 2,
                    "enable_bucket": True,
                    "min_bucket_reso": 64,
                    "max_bucket_reso": 128,
                    "bucket_reso_steps": 32,
                    "subsets": [{"image_dir": paths["img"], "class_tokens": "sks frog", "num_repeats": 5}],
                }
            ],
        },
        {
            "general": {"shuffle_caption": True, "caption_extension": ".txt", "keep_tokens": 1},
            "datasets": [
                {
                    "resolution": 512,
                    "batch_size": 4,
                    "keep_tokens": 2,
                    "subsets": [
                        {"image_dir": paths["img"], "class_tokens": "hoge girl"},
                        {"image_dir": paths["cond"], "class_tokens": "fuga boy", "keep_tokens": 3},
                        {"is_reg": True, "image_dir": paths["reg"], "class_tokens": "human", "keep_tokens": 1},
                    ],
                },
                {
                    "resolution": [768, 768],
                    "batch_size": 2,
                    "subsets": [{"image_dir": paths["img"], "metadata_file": paths["meta"]}],
                },
            ],
        },
        {
            "general": {"flip_aug": True, "color_aug": False, "resolution": [1024, 1024]},
            "datasets": [
                {
                    "batch_size": 6,
                    "enable_bucket": True,
                    "bucket_no_upscale": True,
                    "caption_extension": ".txt",
                    "keep_tokens_separator": "|||",
                    "shuffle_caption": True,
                    "caption_tag_dropout_rate": 0.1,
                    "secondary_separator": ";;;",
                    "enable_wildcard": True,
                    "subsets": [
                        {
                            "image_dir": paths["img"],
                            "num_repeats": 1,
                            "caption_prefix": "1girl, hatsune miku, vocaloid |||",
                            "caption_suffix": ", anime screencap ||| masterpiece, rating: general",
                        }
                    ],
                }
            ],
        },
        {
            "datasets": [
                {
                    "resolution": [512, 650],
                    "subsets": [{"image_dir": paths["img"], "conditioning_data_dir": paths["cond"], "num_repeats": 8}],
                }
            ]
        },
    ]


# --- structure mutations ------------------------------------------------------------------------------------------
def _tables(node: Any, found: list[dict]) -> list[dict]:
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            _tables(value, found)
    elif isinstance(node, list):
        for value in node:
            _tables(value, found)
    return found


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            rng.choice(ODD_NUMBERS),
            rng.choice(ODD_STRINGS),
            rng.choice([True, False, [], {}, [1, 2, 3], {"a": 1}, [[1], [2]], "512,650", 1.5]),
        ]
    )


def mutate_structure(config: Any, rng: random.Random) -> Any:
    """One structural change somewhere in the config (in place where possible); returns the new root."""
    tables = _tables(config, [])
    if not tables:
        return {"datasets": config}
    table = rng.choice(tables)
    keys = list(table)
    action = rng.randrange(7)
    if action == 0 and keys:  # type swap / odd value
        table[rng.choice(keys)] = _odd_value(rng)
    elif action == 1:  # add a (maybe misplaced) key with an odd value
        table[rng.choice(KEYS)] = _odd_value(rng)
    elif action == 2 and keys:  # delete a key
        del table[rng.choice(keys)]
    elif action == 3 and keys:  # misspell or mangle a key
        key = rng.choice(keys)
        table[key[:-1] + rng.choice("xs_") if key else "?"] = table.pop(key)
    elif action == 4 and keys:  # nest a value deeply
        key, value = rng.choice(keys), table[rng.choice(keys)]
        for _ in range(rng.choice([1, 5, 60])):
            value = rng.choice([[value], {"x": value}])
        table[key] = value
    elif action == 5 and keys:  # odd path or huge number
        table[rng.choice(keys)] = rng.choice([rng.choice(ODD_STRINGS), rng.choice(ODD_NUMBERS)])
    else:  # change the root's shape
        return rng.choice([[config], {"general": config}, config, {"datasets": {"subsets": config}}])
    return config


# --- byte mutations ----------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    action = rng.randrange(7)
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
    if action == 0:  # flip bytes
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if action == 1:  # truncate
        return data[: rng.randrange(len(data))]
    if action == 2:  # insert garbage
        at = rng.randrange(len(data) + 1)
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))) + data[at:]
    if action == 3:  # another encoding
        text = data.decode("utf-8", "replace") + "# café ü\n"
        return text.encode(rng.choice(["latin-1", "utf-16", "cp1252", "utf-32"]), "replace")
    lines = data.split(b"\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    if action == 4:  # duplicate a line (duplicate keys / tables)
        lines.insert(j, lines[i])
    elif action == 5:  # delete a line
        del lines[i]
    else:  # swap two lines
        lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def serialise(config: Any, as_toml: bool) -> bytes:
    """The config as TOML or JSON text; a structure the TOML writer cannot express falls back to JSON."""
    if as_toml and isinstance(config, dict):
        try:
            return toml.dumps(config).encode("utf-8", "surrogatepass")
        except Exception:  # the toml writer fails on some shapes; those inputs are still tried as JSON
            pass
    try:
        return json.dumps(config, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return b"{}"


def fuzz_case(rng: random.Random, root: Path, paths: dict[str, str]) -> tuple[str, Path]:
    """Write one mutated config (and sometimes a mutated metadata file); returns (kind, config path)."""
    config = rng.choice(seed_configs(paths))
    for _ in range(rng.randrange(0, 4)):
        config = mutate_structure(config, rng)
    as_toml = rng.random() < 0.6
    data = serialise(config, as_toml)
    for _ in range(rng.randrange(0, 3)):
        data = mutate_bytes(data, rng)
    meta = json.dumps({str(root / "img" / "a.png"): {"caption": "a frog"}}).encode()
    if rng.random() < 0.2:
        meta = mutate_bytes(meta, rng)
    (root / "meta.json").write_bytes(meta)
    path = root / ("case.toml" if as_toml else "case.json")
    path.write_bytes(data)
    return ("toml" if as_toml else "json"), path


def run_case(path: Path, parser: argparse.ArgumentParser) -> None:
    """What a training script does with ``--dataset_config path`` up to its first batch plan."""
    datasets = load_dataset_configs(dataset_flags(parser.parse_args(["--dataset_config", str(path)])), BOTH)
    scans = [scan_dataset(d) for d in datasets]
    TrainDataset(datasets, [s.records for s in scans], seed=0)


def fuzz(iterations: int, seed: int = 20251201, on_case: Callable[[str], None] | None = None) -> Counter:
    """Run ``iterations`` cases; counts 'accepted', 'UserError' and 'other:<type>' (with the first 5 others kept)."""
    counts: Counter = Counter()
    rng = random.Random(seed)
    others: list[str] = []
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        root = Path(tmp)
        paths = make_world(root)
        for _ in range(iterations):
            kind, path = fuzz_case(rng, root, paths)
            try:
                run_case(path, parser)
                counts["accepted"] += 1
            except UserError as e:
                message = str(e)
                if "\n" in message or len(message) > 1000:
                    counts["bad message"] += 1
                    others.append(f"bad message: {message[:300]!r}")
                else:
                    counts["UserError"] += 1
            except Exception as e:  # everything else is the defect this test is looking for
                counts[f"other:{type(e).__name__}"] += 1
                if len(others) < 5:
                    others.append(f"{type(e).__name__}: {str(e)[:200]} <- {path.read_bytes()[:300]!r}")
            if on_case:
                on_case(kind)
    counts["_examples"] = len(others)
    fuzz.examples = others  # type: ignore[attr-defined]
    return counts


def test_mutated_configs_are_accepted_or_user_errors():
    started = time.perf_counter()
    counts = fuzz(2000)
    examples = fuzz.examples  # type: ignore[attr-defined]
    assert examples == [], examples
    assert counts["accepted"] + counts["UserError"] == 2000
    assert counts["accepted"] >= 50 and counts["UserError"] >= 300, counts  # both paths are really exercised
    assert time.perf_counter() - started < 60


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    t0 = time.perf_counter()
    result = fuzz(n)
    print(dict(result), f"{time.perf_counter() - t0:.1f} s")
    for line in fuzz.examples:  # type: ignore[attr-defined]
        print(line)
