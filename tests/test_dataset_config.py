"""Dataset config: TOML/JSON schema, key precedence (subset -> dataset -> general -> flag -> default), folder
conventions, --in_json, and the exact text of every error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import pytest

from library.config.dataset_config import DatasetFlags, dataset_flags, load_dataset_configs
from library.config.flags import add_dataset_arguments
from library.config.values import DATASET_RANGES
from library.errors import UserError
from tests.images import write_image

BOTH = {"dreambooth", "finetune"}


def parse(*argv: str) -> DatasetFlags:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return dataset_flags(parser.parse_args(list(argv)))


def write_json_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(config))
    return path


def image_folder(tmp_path: Path, name: str = "img", count: int = 1) -> Path:
    folder = tmp_path / name
    for i in range(count):
        write_image(folder / f"{i}.png", (16, 16), seed=i)
    return folder


def load_toml(tmp_path: Path, text: str, *flags: str, styles: set[str] = BOTH):
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return load_dataset_configs(parse("--dataset_config", str(path), *flags), styles)


def error_of(tmp_path: Path, text: str, *flags: str, styles: set[str] = BOTH) -> str:
    with pytest.raises(UserError) as info:
        load_toml(tmp_path, text, *flags, styles=styles)
    return str(info.value)


# --- precedence -------------------------------------------------------------------------------------------------
# key: (value at subset, dataset, general level (as written in the file), the same values as resolved,
#       flag argv (or None when the key has no flag), value the flag gives, default)
SUBSET_KEYS = {
    "num_repeats": ([3, 2, 0.5], [3, 2, 0.5], ["--dataset_repeats", "7"], 7.0, 1),
    "shuffle_caption": ([False, True, False], None, ["--shuffle_caption"], True, False),
    "caption_separator": ([";", "|", "/"], None, ["--caption_separator", "#"], "#", ","),
    "keep_tokens": ([3, 2, 1], None, ["--keep_tokens", "4"], 4, 0),
    "keep_tokens_separator": (["|||", "###", "@@@"], None, ["--keep_tokens_separator", "&&&"], "&&&", ""),
    "secondary_separator": ([";;;", "^^^", "%%%"], None, ["--secondary_separator", "$$$"], "$$$", None),
    "enable_wildcard": ([False, True, False], None, ["--enable_wildcard"], True, False),
    "caption_prefix": (["p1", "p2", "p3"], None, ["--caption_prefix", "p4"], "p4", None),
    "caption_suffix": (["s1", "s2", "s3"], None, ["--caption_suffix", "s4"], "s4", None),
    "color_aug": ([False, True, False], None, ["--color_aug"], True, False),
    "flip_aug": ([False, True, False], None, ["--flip_aug"], True, False),
    "face_crop_aug_range": (
        [[1.0, 2.0], [2, 3], [3.5, 4]],
        [(1.0, 2.0), (2.0, 3.0), (3.5, 4.0)],
        ["--face_crop_aug_range", "4.0,5.0"],
        (4.0, 5.0),
        None,
    ),
    "random_crop": ([False, True, False], None, ["--random_crop"], True, False),
    "token_warmup_min": ([5, 4, 3], None, ["--token_warmup_min", "2"], 2, 1),
    "token_warmup_step": ([100, 0.5, 10], None, ["--token_warmup_step", "20"], 20.0, 0),
    "caption_dropout_rate": ([0.1, 0.2, 0.3], None, ["--caption_dropout_rate", "0.4"], 0.4, 0.0),
    "caption_dropout_every_n_epochs": ([2, 3, 4], None, ["--caption_dropout_every_n_epochs", "5"], 5, 0),
    "caption_tag_dropout_rate": ([0.1, 0.2, 0.3], None, ["--caption_tag_dropout_rate", "0.4"], 0.4, 0.0),
    "custom_attributes": ([{"a": 1}, {"b": 2}, {"c": 3}], None, None, None, {}),
    "caption_extension": ([".txt", "cap", ".tags"], [".txt", ".cap", ".tags"], ["--caption_extension", "f"], ".f", ""),
    "class_tokens": (["sks dog", "dog", "animal"], None, None, None, None),
    "cache_info": ([False, True, False], None, ["--cache_info"], True, False),
}
DATASET_KEYS = {
    "batch_size": ([4, 3], None, ["--train_batch_size", "2"], 2, 1),
    "resolution": ([[640, 384], 768], [(640, 384), (768, 768)], ["--resolution", "320,256"], (320, 256), (512, 512)),
    "enable_bucket": ([False, True], None, ["--enable_bucket"], True, False),
    "min_bucket_reso": ([128, 192], None, ["--min_bucket_reso", "320"], 320, 256),
    "max_bucket_reso": ([2048, 1536], None, ["--max_bucket_reso", "1280"], 1280, 1024),
    "bucket_reso_steps": ([32, 16], None, ["--bucket_reso_steps", "8"], 8, 64),
    "bucket_no_upscale": ([False, True], None, ["--bucket_no_upscale"], True, False),
    "network_multiplier": ([0.5, 0.25], None, None, None, 1.0),
    "validation_seed": ([7, 8], None, ["--validation_seed", "9"], 9, None),
    "validation_split": ([0.1, 0.2], None, ["--validation_split", "0.3"], 0.3, 0.0),
    "resize_interpolation": (["lanczos", "area"], None, ["--resize_interpolation", "bicubic"], "bicubic", None),
}


def _resolve(tmp_path: Path, subset: dict, dataset: dict, general: dict, flags: list[str]):
    folder = image_folder(tmp_path)
    config = {"general": general, "datasets": [{**dataset, "subsets": [{"image_dir": str(folder), **subset}]}]}
    path = write_json_config(tmp_path, config)
    return load_dataset_configs(parse("--dataset_config", str(path), *flags), BOTH)[0]


@pytest.mark.parametrize("key", SUBSET_KEYS)
def test_subset_key_precedence(tmp_path, key):
    written, resolved, flag, flag_value, default = SUBSET_KEYS[key]
    resolved = resolved or written
    if key == "caption_extension":
        default = ".caption"
    levels = ["subset", "dataset", "general", "flag", "default"]
    for start, winner in enumerate(levels):
        chosen = levels[start:]
        if winner == "flag" and flag is None:
            continue
        values = {level: {key: written[i]} if level in chosen else {} for i, level in enumerate(levels[:3])}
        flags = flag if ("flag" in chosen and flag) else []
        subset = _resolve(tmp_path, values["subset"], values["dataset"], values["general"], flags).subsets[0]
        expected = {"subset": resolved[0], "dataset": resolved[1], "general": resolved[2]}.get(winner)
        if winner == "flag":
            expected = flag_value
        if winner == "default":
            expected = default
        assert getattr(subset, key) == expected, f"{key}: {winner} level should win"


@pytest.mark.parametrize("key", DATASET_KEYS)
def test_dataset_key_precedence(tmp_path, key):
    written, resolved, flag, flag_value, default = DATASET_KEYS[key]
    resolved = resolved or written
    levels = ["dataset", "general", "flag", "default"]
    for start, winner in enumerate(levels):
        chosen = levels[start:]
        if winner == "flag" and flag is None:
            continue
        dataset = {key: written[0]} if "dataset" in chosen else {}
        general = {key: written[1]} if "general" in chosen else {}
        flags = flag if ("flag" in chosen and flag) else []
        got = getattr(_resolve(tmp_path, {}, dataset, general, flags), key)
        expected = {"dataset": resolved[0], "general": resolved[1], "flag": flag_value, "default": default}[winner]
        assert got == expected, f"{key}: {winner} level should win"


def test_subset_only_keys_and_alpha_mask_flag_fallback(tmp_path):
    folder = image_folder(tmp_path)
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"file_name": "0.png", "text": "x"}\n')
    config = {
        "datasets": [
            {"subsets": [{"image_dir": str(folder), "is_reg": True, "alpha_mask": False}, {"image_dir": str(folder)}]},
            {"subsets": [{"metadata_file": str(meta), "image_dir": str(folder), "alpha_mask": True}]},
        ]
    }
    path = write_json_config(tmp_path, config)
    first, second = load_dataset_configs(parse("--dataset_config", str(path), "--alpha_mask"), BOTH)
    assert (first.style, second.style) == ("dreambooth", "finetune")
    assert [(s.is_reg, s.alpha_mask) for s in first.subsets] == [(True, False), (False, True)]
    assert second.subsets[0].metadata_file == meta and second.subsets[0].image_dir == folder
    assert [s.name for s in first.subsets] == ["datasets[0].subsets[0]", "datasets[0].subsets[1]"]
    no_flag = load_dataset_configs(parse("--dataset_config", str(path)), BOTH)[0]
    assert no_flag.subsets[1].alpha_mask is False


def test_toml_file_with_all_levels(tmp_path):
    folder = image_folder(tmp_path)
    datasets = load_toml(
        tmp_path,
        f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{folder}'
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = '{folder}'
  is_reg = true
  keep_tokens = 3
""",
        "--caption_extension",
        ".caption",
        "--train_batch_size",
        "8",
    )
    (dataset,) = datasets
    assert (dataset.resolution, dataset.batch_size) == ((768, 768), 4)
    first, second = dataset.subsets
    assert (first.num_repeats, first.class_tokens, first.keep_tokens, first.is_reg) == (10, "sks dog", 2, False)
    assert (second.num_repeats, second.class_tokens, second.keep_tokens, second.is_reg) == (1, None, 3, True)
    assert first.shuffle_caption and first.caption_extension == ".txt"


# --- folders and --in_json ----------------------------------------------------------------------------------------
def test_train_and_reg_folders(tmp_path, caplog):
    train = tmp_path / "train"
    image_folder(train, "10_sls frog")
    image_folder(train, "5_my_dog")
    image_folder(train, "0.5_cat")
    image_folder(train, "misc")
    image_folder(train, ".ipynb_checkpoints")
    (train / "7_notafolder.png").write_bytes(b"")
    reg = tmp_path / "reg"
    image_folder(reg, "1_frog")
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        (dataset,) = load_dataset_configs(
            parse("--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "256"), {"dreambooth"}
        )
    got = [(s.name, s.image_dir, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert got == [
        ("--train_data_dir 0.5_cat", train / "0.5_cat", 0.5, "cat", False),
        ("--train_data_dir 10_sls frog", train / "10_sls frog", 10, "sls frog", False),
        ("--train_data_dir 5_my_dog", train / "5_my_dog", 5, "my_dog", False),
        ("--reg_data_dir 1_frog", reg / "1_frog", 1, "frog", True),
    ]
    assert (dataset.style, dataset.resolution) == ("dreambooth", (256, 256))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--train_data_dir: ignoring folder 'misc': its name does not start with '<repeats>_'"]


def test_folder_flags_reach_subsets(tmp_path):
    train = tmp_path / "train"
    image_folder(train, "3_x")
    args = parse(
        "--train_data_dir", str(train), "--shuffle_caption", "--keep_tokens", "2", "--caption_extention", "txt"
    )
    (subset,) = load_dataset_configs(args, {"dreambooth"})[0].subsets
    assert (subset.shuffle_caption, subset.keep_tokens, subset.caption_extension, subset.num_repeats) == (
        True,
        2,
        ".txt",
        3,
    )


def test_no_repeat_folders_explains_layout(tmp_path):
    train = tmp_path / "train"
    write_image(train / "a.png")
    image_folder(train, "photos")
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--train_data_dir", str(train)), {"dreambooth"})
    assert str(info.value) == (
        f"--train_data_dir {train}: no subfolders named '<repeats>_<class tokens>' found; put the images in a "
        f"subfolder such as '{train}/10_sls frog' (10 repeats per epoch, class tokens 'sls frog')"
    )


def test_in_json_with_train_data_dir(tmp_path):
    folder = image_folder(tmp_path, "images", 2)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"0": {"caption": "a"}, "1": {"tags": "b"}}))
    (dataset,) = load_dataset_configs(
        parse("--in_json", str(meta), "--train_data_dir", str(folder), "--dataset_repeats", "4"), {"finetune"}
    )
    (subset,) = dataset.subsets
    assert (dataset.style, subset.name, subset.metadata_file, subset.image_dir, subset.num_repeats) == (
        "finetune",
        "--in_json",
        meta,
        folder,
        4.0,
    )


def test_no_data_and_style_errors(tmp_path):
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse(), {"dreambooth", "finetune"})
    assert str(info.value) == "no training data: pass --dataset_config FILE.toml or --train_data_dir DIR"
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--train_data_dir", str(tmp_path)), {"finetune"})
    assert str(info.value) == (
        "--train_data_dir: DreamBooth-style datasets (subsets with image_dir, or --train_data_dir folders) are not "
        "supported by this script; it takes fine-tuning datasets (subsets with metadata_file, or --in_json)"
    )
    meta = tmp_path / "m.json"
    meta.write_text("{}")
    folder = image_folder(tmp_path)
    text = f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\nimage_dir = '{folder}'\n"
    assert error_of(tmp_path, text, styles={"dreambooth"}) == (
        f"{tmp_path / 'dataset.toml'}: datasets[0]: fine-tuning datasets (subsets with metadata_file, or --in_json) "
        "are not supported by this script; it takes DreamBooth-style datasets (subsets with image_dir, or "
        "--train_data_dir folders)"
    )


# --- error messages -------------------------------------------------------------------------------------------------
def test_error_messages(tmp_path):
    folder = image_folder(tmp_path)
    src = tmp_path / "dataset.toml"
    sub = f"[[datasets.subsets]]\nimage_dir = '{folder}'\n"
    cases = [
        (
            f"[[datasets]]\n{sub}{sub}num_repeat = 3\n",
            "datasets[0].subsets[1]: unknown key 'num_repeat' (did you mean 'num_repeats'?)",
        ),
        (f'[[datasets]]\nbatch_size = "four"\n{sub}', "datasets[0]: key 'batch_size' must be an integer, got \"four\""),
        ("[[datasets]]\nbatch_size = true\n" + sub, "datasets[0]: key 'batch_size' must be an integer, got true"),
        ("[general]\nflip_aug = 1\n", "general: key 'flip_aug' must be true or false, got 1"),
        (
            f"[[datasets]]\n{sub}caption_dropout_rate = 1.5\n",
            "datasets[0].subsets[0]: key 'caption_dropout_rate' must be a number from 0 to 1, got 1.5",
        ),
        (
            f"[[datasets]]\nresolution = [512]\n{sub}",
            "datasets[0]: key 'resolution' must be a whole number from 1 to 16384 or [width, height] of such, got "
            "[512]",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n",
            "datasets[0].subsets[0]: missing required key 'image_dir' (the folder holding this subset's images)",
        ),
        (
            f"[[datasets]]\n{sub}batch_size = 2\n",
            "datasets[0].subsets[0]: key 'batch_size' is a dataset setting; move it to its [[datasets]] entry or to "
            "[general]",
        ),
        (
            f"[general]\nimage_dir = '{folder}'\n",
            "general: key 'image_dir' belongs in a [[datasets.subsets]] entry, not in [general]",
        ),
        ("[dataset]\n", "unknown top-level key 'dataset' (did you mean 'datasets'?)"),
        ("[general]\n", "no [[datasets]] entry; add one with at least one [[datasets.subsets]] (image_dir = ...)"),
        (
            "[[datasets]]\nbatch_size = 1\n",
            'datasets[0]: has no [[datasets.subsets]]; add one with image_dir = "<folder of images>"',
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nowhere/at/all'\n",
            "datasets[0].subsets[0]: image_dir 'nowhere/at/all' does not exist or is not a folder (relative paths are "
            "taken from the current directory)",
        ),
        (
            f"[[datasets]]\n{sub}[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
            "datasets[0]: subsets [1] use metadata_file (fine-tuning style) but subsets [0] do not (DreamBooth style); "
            "one dataset cannot mix the two, so split them into separate [[datasets]] entries",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'm.json'\nis_reg = true\n",
            "datasets[0].subsets[0]: key 'is_reg' is only for DreamBooth-style subsets (image_dir without "
            "metadata_file)",
        ),
        (
            f"[[datasets]]\n{sub}resize_interpolation = 'fancy'\n",
            "datasets[0].subsets[0]: key 'resize_interpolation' is a dataset setting; move it to its [[datasets]] "
            "entry or to [general]",
        ),
        (
            f"[[datasets]]\nresize_interpolation = 'fancy'\n{sub}",
            "datasets[0]: key 'resize_interpolation' must be one of lanczos, nearest, bilinear, linear, bicubic, "
            'cubic, area, box, got "fancy"',
        ),
        (
            f"[[datasets]]\nenable_bucket = true\nresolution = [512, 768]\nmin_bucket_reso = 640\n{sub}",
            "datasets[0]: min_bucket_reso 640 is larger than the resolution's shorter side 512; lower min_bucket_reso "
            "or raise resolution",
        ),
        (
            f"[general]\nenable_bucket = true\nresolution = [512, 768]\n[[datasets]]\nmax_bucket_reso = 640\n{sub}",
            "datasets[0]: max_bucket_reso 640 is smaller than the resolution's longer side 768; raise max_bucket_reso "
            "or lower resolution",
        ),
    ]
    for text, message in cases:
        assert error_of(tmp_path, text) == f"{src}: {message}", text


def test_syntax_and_file_errors(tmp_path):
    src = tmp_path / "dataset.toml"
    message = error_of(tmp_path, '[general]\nshuffle_caption = true\ncaption_prefix = "unclosed\n')
    assert message == f"{src}: TOML syntax error at line 3, column 27: Unbalanced quotes"
    bad_json = tmp_path / "dataset.json"
    bad_json.write_text('{"datasets": [\n  {"subsets": }\n]}')
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--dataset_config", str(bad_json)), BOTH)
    assert str(info.value) == f"{bad_json}: JSON syntax error at line 2, column 15: Expecting value"
    for name, expected in [
        (
            "missing.toml",
            f"--dataset_config {tmp_path / 'missing.toml'}: file not found (does not exist or is not a file)",
        ),
        ("d.yaml", f"--dataset_config {tmp_path / 'd.yaml'}: unsupported file type '.yaml'; use a .toml or .json file"),
    ]:
        if name.endswith(".yaml"):
            (tmp_path / name).write_text("x: 1")
        with pytest.raises(UserError) as info:
            load_dataset_configs(parse("--dataset_config", str(tmp_path / name)), BOTH)
        assert str(info.value) == expected


def test_flag_errors(tmp_path):
    train = tmp_path / "train"
    image_folder(train, "1_x")
    for flags, message in [
        (["--resolution", "big"], "--resolution: expected 'SIZE' or 'WIDTH,HEIGHT' such as 512 or 512,768, got 'big'"),
        (
            ["--resolution", "1,2,3"],
            "--resolution: expected 'SIZE' or 'WIDTH,HEIGHT' such as 512 or 512,768, got '1,2,3'",
        ),
        (["--face_crop_aug_range", "4,2"], "--face_crop_aug_range: MIN must be above 0 and not exceed MAX, got '4,2'"),
    ]:
        with pytest.raises(UserError) as info:
            load_dataset_configs(parse("--train_data_dir", str(train), *flags), {"dreambooth"})
        assert str(info.value) == message
    with pytest.raises(UserError) as info:
        load_dataset_configs(
            parse("--train_data_dir", str(train), "--enable_bucket", "--resolution", "128"), {"dreambooth"}
        )
    assert str(info.value) == (
        "--train_data_dir: --min_bucket_reso 256 is larger than the resolution's shorter side 128; lower "
        "min_bucket_reso or raise resolution"
    )
    # settings built without our parser still get the shared range check
    args = dataclasses.replace(parse("--train_data_dir", str(train)), dataset_repeats=float("nan"))
    with pytest.raises(UserError) as info:
        load_dataset_configs(args, {"dreambooth"})
    assert str(info.value) == f"--dataset_repeats: must be {DATASET_RANGES['num_repeats'].describe()}, got nan"
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--train_data_dir", str(tmp_path / "nope")), {"dreambooth"})
    assert str(info.value) == (
        f"--train_data_dir {tmp_path / 'nope'}: folder not found (does not exist or is not a folder)"
    )


def test_resolution_not_a_multiple_of_64_without_buckets_as_sd_scripts(tmp_path):
    folder = image_folder(tmp_path)
    sub = f"[[datasets.subsets]]\nimage_dir = '{folder}'\n"
    assert load_toml(tmp_path, f"[[datasets]]\nresolution = [512, 650]\n{sub}")[0].resolution == (512, 650)
    train = tmp_path / "train"
    image_folder(train, "1_x")
    args = parse("--train_data_dir", str(train), "--resolution", "512,650")
    assert load_dataset_configs(args, {"dreambooth"})[0].resolution == (512, 650)


def test_bucket_step_errors_name_the_key_or_flag(tmp_path):
    folder = image_folder(tmp_path)
    src = tmp_path / "dataset.toml"
    sub = f"[[datasets.subsets]]\nimage_dir = '{folder}'\n"
    rule = (
        "must be a positive multiple of 8 when buckets are on (every bucket side is a multiple of it); "
        "use 64, or 32 for SDXL"
    )
    assert error_of(tmp_path, f"[[datasets]]\nenable_bucket = true\nbucket_reso_steps = 1\n{sub}") == (
        f"{src}: datasets[0]: bucket_reso_steps = 1 {rule}, as sd-scripts does"
    )
    assert error_of(tmp_path, f"[general]\nbucket_reso_steps = 12\n[[datasets]]\nenable_bucket = true\n{sub}") == (
        f"{src}: datasets[0]: [general] bucket_reso_steps = 12 {rule}, as sd-scripts does"
    )
    train = tmp_path / "train"
    image_folder(train, "1_x")
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--train_data_dir", str(train), "--enable_bucket", "--bucket_reso_steps", "1"), BOTH)
    assert str(info.value) == f"--train_data_dir: --bucket_reso_steps = 1 {rule}, as sd-scripts does"


def test_min_max_bucket_reso_rounded_to_the_step_as_sd_scripts(tmp_path, caplog):
    folder = image_folder(tmp_path)
    text = "[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 300\nmax_bucket_reso = 1000\n"
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        dataset = load_toml(tmp_path, text + f"[[datasets.subsets]]\nimage_dir = '{folder}'\n")[0]
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (256, 1024)
    src = tmp_path / "dataset.toml"
    assert caplog.messages == [
        f"{src}: datasets[0]: min_bucket_reso 300 is not a multiple of bucket_reso_steps 64; using 256",
        f"{src}: datasets[0]: max_bucket_reso 1000 is not a multiple of bucket_reso_steps 64; using 1024",
    ]


def test_fuzzer_findings_are_one_line_user_errors(tmp_path):
    folder = image_folder(tmp_path)
    src = tmp_path / "dataset.toml"
    sub = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\n"
    repeats = DATASET_RANGES["num_repeats"].describe()
    long_dir = "d" * 300
    cases = [
        (sub + "num_repeats = inf\n", f"key 'num_repeats' must be {repeats}, got Infinity"),
        (sub + "num_repeats = nan\n", f"key 'num_repeats' must be {repeats}, got NaN"),
        (sub + "num_repeats = 1e12\n", f"key 'num_repeats' must be {repeats}, got 1000000000000.0"),
        (
            sub + "caption_prefix = 5\ncustom_attributes = 1\n",
            "datasets[0].subsets[0]: key 'caption_prefix' must be a string, got 5",
        ),
        (
            f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{long_dir}'\n",
            f"datasets[0].subsets[0]: image_dir '{long_dir[:77]}...' is too long for the file system (4096 "
            "characters in all, 255 per folder or file name) or is not a folder (relative paths are taken from the "
            "current directory)",
        ),
        ("general = 1\n[general.x]\n", None),
        (
            sub + "caption_separator = ''\n",
            "key 'caption_separator' must be a non-empty string (tags are split at it), got \"\"",
        ),
    ]
    for text, message in cases:
        got = error_of(tmp_path, text)
        if message is not None:
            assert got == f"{src}: {message}" or got == f"{src}: datasets[0].subsets[0]: {message}", got
        assert "\n" not in got and got.startswith(f"{src}: ")
    src.write_bytes("[general]\ncaption_prefix = 'café'\n".encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--dataset_config", str(src)), BOTH)
    assert str(info.value) == f"{src}: --dataset_config file is not UTF-8 text (byte 31 is 0xe9); re-save it as UTF-8"
    big = {"datasets": [{"subsets": [{"image_dir": str(folder), "custom_attributes": {"k" * 500: [1] * 500}}]}]}
    big["datasets"][0]["subsets"][0]["is_reg"] = {"x": ["y" * 1000]}
    with pytest.raises(UserError) as info:
        load_dataset_configs(parse("--dataset_config", str(write_json_config(tmp_path, big))), BOTH)
    assert str(info.value).endswith('key \'is_reg\' must be true or false, got {"x": ["' + "y" * 69 + "...")


def test_cache_info_flag_on_fine_tuning_data_is_named_as_unused(tmp_path, caplog):
    folder = image_folder(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({str(folder / "0.png"): {"caption": "x"}}))
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        load_dataset_configs(parse("--in_json", str(meta), "--cache_info"), {"finetune"})
    assert caplog.messages == [
        "--cache_info caches DreamBooth-style folders only (as in sd-scripts); fine-tuning datasets ignore it"
    ]
