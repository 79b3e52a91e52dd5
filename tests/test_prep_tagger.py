"""finetune/tag_images_by_wd14_tagger.py on a tiny ONNX tagger whose scores are known: a plain red square scores
each tag exactly ``bias + red weight`` (tests/tiny_tagger.py), so every flag's output is checked word for word."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.tag_images_by_wd14_tagger import main
from library.cli import run_cli
from library.errors import UserError
from library.prep.tag_order import (
    TagOptions,
    TagTable,
    merge_with_existing,
    parse_tag_replacement,
    select_tags,
)
from library.prep.tagger import open_for_tagger, pick_providers, to_model_input
from tests.tiny_tagger import make_tiny_tagger

REPO = Path(__file__).resolve().parent.parent
RED, BLUE = (255, 0, 0), (0, 0, 255)
RED_TAGS = "1girl, solo, red_theme, long_hair, ^_^, red_hero, kaito_(vocaloid)"
BLUE_TAGS = "1girl, solo, blue_theme, long_hair, hatsune_miku_(vocaloid)"


@pytest.fixture(scope="module")
def tagger() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="sdt-tagger-"))
    make_tiny_tagger(folder / "tiny")
    make_tiny_tagger(folder / "fixed4", batch=4)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def square(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def tag(folder: Path, tagger: Path, *flags: str, model: str = "tiny") -> int:
    return run_cli(main, [str(folder), "--model_dir", str(tagger / model), *flags])


def test_nested_folders_and_a_corrupt_image(tmp_path, tagger, capsys):
    square(tmp_path / "red.png", RED)
    square(tmp_path / "sub" / "deeper" / "blue.webp", BLUE)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert tag(tmp_path, tagger, "--batch_size", "2") == 0
    assert (tmp_path / "red.txt").read_text() == RED_TAGS + "\n"
    assert not (tmp_path / "sub" / "deeper" / "blue.txt").exists()
    assert tag(tmp_path, tagger, "--recursive", "--batch_size", "2", "--max_data_loader_n_workers", "1") == 0
    assert (tmp_path / "sub" / "deeper" / "blue.txt").read_text() == BLUE_TAGS + "\n"
    assert not (tmp_path / "broken.txt").exists()
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    assert "tagging: 1 processed, 1 skipped (already done), 1 failed, 1 written" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], RED_TAGS),
        (["--onnx"], RED_TAGS),
        (["--character_tags_first"], "kaito_(vocaloid), red_hero, 1girl, solo, red_theme, long_hair, ^_^"),
        (["--use_rating_tags"], "general, " + RED_TAGS),
        (["--use_rating_tags_as_last_tag"], RED_TAGS + ", general"),
        (
            ["--use_rating_tags", "--character_tags_first"],
            "general, kaito_(vocaloid), red_hero, 1girl, solo, red_theme, long_hair, ^_^",
        ),
        (
            ["--always_first_tags", "long_hair, red_hero"],
            "red_hero, long_hair, 1girl, solo, red_theme, ^_^, kaito_(vocaloid)",
        ),
        (["--always_first_tags", "blue_theme"], RED_TAGS),
        (["--thresh", "0.55"], "1girl, solo, red_theme, kaito_(vocaloid)"),
        (["--thresh", "0.1"], "1girl, solo, red_theme, long_hair, ^_^, simple_background, red_hero, kaito_(vocaloid)"),
        (
            ["--general_threshold", "0.65", "--character_threshold", "0.42"],
            "1girl, red_theme, red_hero, kaito_(vocaloid)",
        ),
        (["--thresh", "0.55", "--character_threshold", "0.3"], "1girl, solo, red_theme, red_hero, kaito_(vocaloid)"),
        (["--character_threshold", "1.1"], "1girl, solo, red_theme, long_hair, ^_^"),
        (["--undesired_tags", "solo, kaito_(vocaloid)"], "1girl, red_theme, long_hair, ^_^, red_hero"),
        (["--undesired_tags", "general", "--use_rating_tags"], RED_TAGS),
        (["--remove_underscore"], "1girl, solo, red theme, long hair, ^_^, red hero, kaito (vocaloid)"),
        (
            ["--remove_underscore", "--undesired_tags", "long hair"],
            "1girl, solo, red theme, ^_^, red hero, kaito (vocaloid)",
        ),
        (
            ["--tag_replacement", "1girl,1woman;long_hair,very\\,long\\;hair"],
            "1woman, solo, red_theme, very,long;hair, ^_^, red_hero, kaito_(vocaloid)",
        ),
        (["--caption_separator", "; "], RED_TAGS.replace(", ", "; ")),
        (
            ["--caption_separator", "|", "--undesired_tags", "solo|^_^"],
            "1girl|red_theme|long_hair|red_hero|kaito_(vocaloid)",
        ),
        (["--character_tag_expand"], "1girl, solo, red_theme, long_hair, ^_^, red_hero, kaito, vocaloid"),
    ],
)
def test_tag_order_and_selection_flags(tmp_path, tagger, flags, expected):
    square(tmp_path / "red.png", RED)
    assert tag(tmp_path, tagger, *flags) == 0
    assert (tmp_path / "red.txt").read_text() == expected + "\n"


def test_caption_extension_and_repo_folder_layout(tmp_path, tagger):
    models = tmp_path / "models"
    shutil.copytree(tagger / "tiny", models / "me_tiny-tagger")
    square(tmp_path / "data" / "red.jpg", RED)
    argv = [str(tmp_path / "data"), "--model_dir", str(models), "--repo_id", "me/tiny-tagger"]
    assert run_cli(main, [*argv, "--caption_extension", "tags"]) == 0
    assert (tmp_path / "data" / "red.tags").read_text() == RED_TAGS + "\n"
    assert run_cli(main, [*argv, "--caption_extention", ".cap"]) == 0
    assert (tmp_path / "data" / "red.cap").read_text() == RED_TAGS + "\n"


def test_existing_tag_files_are_kept_unless_overwrite(tmp_path, tagger):
    square(tmp_path / "red.png", RED)
    (tmp_path / "red.txt").write_text("hand written\n")
    assert tag(tmp_path, tagger) == 0
    assert (tmp_path / "red.txt").read_text() == "hand written\n"
    assert tag(tmp_path, tagger, "--overwrite") == 0
    assert (tmp_path / "red.txt").read_text() == RED_TAGS + "\n"


def test_append_tags_extends_once(tmp_path, tagger, capsys):
    square(tmp_path / "red.png", RED)
    square(tmp_path / "blue.png", BLUE)
    (tmp_path / "red.txt").write_text("my_style,  solo\n")
    assert tag(tmp_path, tagger, "--append_tags") == 0
    expected = "my_style, solo, 1girl, red_theme, long_hair, ^_^, red_hero, kaito_(vocaloid)\n"
    assert (tmp_path / "red.txt").read_text() == expected
    assert (tmp_path / "blue.txt").read_text() == BLUE_TAGS + "\n"
    capsys.readouterr()
    assert tag(tmp_path, tagger, "--append_tags") == 0
    assert (tmp_path / "red.txt").read_text() == expected
    assert (tmp_path / "blue.txt").read_text() == BLUE_TAGS + "\n"
    assert "2 processed, 0 skipped (already done), 0 failed, 0 written" in capsys.readouterr().err


def test_resume_redoes_only_missing_tag_files(tmp_path, tagger, capsys):
    for n in range(3):
        square(tmp_path / f"red{n}.png", RED)
    assert tag(tmp_path, tagger, "--batch_size", "2") == 0
    (tmp_path / "red1.txt").unlink()
    for n in (0, 2):
        (tmp_path / f"red{n}.txt").write_text("finished earlier\n")
    capsys.readouterr()
    assert tag(tmp_path, tagger, "--batch_size", "2") == 0
    assert [(tmp_path / f"red{n}.txt").read_text() for n in range(3)] == [
        "finished earlier\n",
        RED_TAGS + "\n",
        "finished earlier\n",
    ]
    assert "1 processed, 2 skipped (already done), 0 failed, 1 written" in capsys.readouterr().err
    gone = tmp_path / "no-such-model"
    assert run_cli(main, [str(tmp_path), "--model_dir", str(gone), "--repo_id", "me/offline"]) == 0
    assert "0 processed, 3 skipped (already done), 0 failed, 0 written" in capsys.readouterr().err


def test_frequency_tags(tmp_path, tagger, capsys):
    square(tmp_path / "a.png", RED)
    square(tmp_path / "b.png", BLUE)
    square(tmp_path / "c.png", RED)
    assert tag(tmp_path, tagger, "--frequency_tags", "--use_rating_tags", "--thresh", "0.55") == 0
    assert capsys.readouterr().out.splitlines() == [
        "Tag frequencies:",
        "1girl: 3",
        "solo: 3",
        "general: 2",
        "red_theme: 2",
        "kaito_(vocaloid): 2",
        "sensitive: 1",
        "blue_theme: 1",
        "hatsune_miku_(vocaloid): 1",
    ]


def test_fixed_batch_model_pads_the_last_batch(tmp_path, tagger, capsys):
    for n in range(5):
        square(tmp_path / f"img{n}.png", RED if n % 2 else BLUE)
    assert tag(tmp_path, tagger, "--batch_size", "3", model="fixed4") == 0
    assert [(tmp_path / f"img{n}.txt").read_text() for n in range(5)] == [
        (RED_TAGS if n % 2 else BLUE_TAGS) + "\n" for n in range(5)
    ]
    assert "--batch_size 3: this model takes batches of 4" in capsys.readouterr().err


def test_preprocessing_pads_white_and_makes_bgr(tmp_path):
    wide = square(tmp_path / "wide.png", RED, size=(40, 20))
    pixels = np.asarray(open_for_tagger(wide, (32, 32)))
    assert pixels.shape == (32, 32, 3)
    assert (pixels[:8] == 255).all() and (pixels[24:] == 255).all()
    assert (pixels[8:24] == RED).all()
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (0, 0, 255, 0)).save(clear)
    batch = to_model_input([open_for_tagger(clear, (32, 32)), open_for_tagger(wide, (32, 32))])
    assert batch.dtype == np.float32 and batch.shape == (2, 32, 32, 3)
    assert (batch[0] == 255).all()
    assert batch[1, 16, 16].tolist() == [0.0, 0.0, 255.0]


def test_missing_model_offline_is_one_line(tmp_path):
    square(tmp_path / "red.png", RED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = REPO / "finetune" / "tag_images_by_wd14_tagger.py"
    cmd = [sys.executable, str(script), str(tmp_path), "--model_dir", str(tmp_path / "m"), "--repo_id", "me/no-tagger"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --repo_id me/no-tagger: cannot download selected_tags.csv")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "red.txt").exists()


def test_force_download_offline_names_the_id(tmp_path, tagger, capsys):
    square(tmp_path / "red.png", RED)
    assert tag(tmp_path, tagger, "--force_download", "--repo_id", "me/tiny") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --repo_id me/tiny: cannot download selected_tags.csv")
    assert line.endswith(f"drop --force_download to use the copy in {tagger / 'tiny'}")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tag_replacement", "a,b;c"], "--tag_replacement 'a,b;c': 'c' is not `source,target`"),
        (["--device", "tpu"], "--device tpu: not a device name"),
        (["--batch_size", "0"], "--batch_size 0: must be 1 or more"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, tagger, capsys, flags, message):
    square(tmp_path / "red.png", RED)
    assert tag(tmp_path, tagger, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_broken_model_files_are_one_line(tmp_path, tagger, capsys):
    square(tmp_path / "data" / "red.png", RED)
    model = tmp_path / "model"
    shutil.copytree(tagger / "tiny", model)
    csv_text = (model / "selected_tags.csv").read_text()
    (model / "selected_tags.csv").write_text(csv_text.rsplit("\n", 2)[0] + "\n")
    assert run_cli(main, [str(tmp_path / "data"), "--model_dir", str(model)]) == 2
    assert "model.onnx gives 14 scores but selected_tags.csv lists 13 tags" in capsys.readouterr().err
    (model / "selected_tags.csv").write_text("id,tag\n1,x\n")
    assert run_cli(main, [str(tmp_path / "data"), "--model_dir", str(model)]) == 2
    assert "expected the header tag_id,name,category,count" in capsys.readouterr().err
    (model / "model.onnx").write_bytes(b"not a model")
    (model / "selected_tags.csv").write_text(csv_text)
    assert run_cli(main, [str(tmp_path / "data"), "--model_dir", str(model)]) == 2
    assert "onnxruntime cannot load this model" in capsys.readouterr().err


def test_cuda_request_without_the_provider_runs_on_cpu(tmp_path, tagger, capsys):
    square(tmp_path / "red.png", RED)
    assert tag(tmp_path, tagger, "--device", "cuda") == 0
    assert (tmp_path / "red.txt").read_text() == RED_TAGS + "\n"
    assert "--device cuda: onnxruntime has no CUDA provider here" in capsys.readouterr().err
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("cuda:1", gpu) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert pick_providers(None, gpu) == gpu
    assert pick_providers("cpu", gpu) == ["CPUExecutionProvider"]


def test_select_tags_rules():
    table = TagTable(("r0", "r1", "a", "b", "c1", "c2", "meta"), ("9", "9", "0", "0", "4", "4", "5"))
    probs = [0.3, 0.3, 0.35, 0.34, 0.5, 0.9, 0.99]
    assert select_tags(probs, table, TagOptions()) == ["a", "c1", "c2"]
    assert select_tags(probs, table, TagOptions(use_rating_tags=True)) == ["r0", "a", "c1", "c2"]
    first = TagOptions(character_tags_first=True, always_first_tags=("a", "missing"))
    assert select_tags(probs, table, first) == ["a", "c2", "c1"]
    assert merge_with_existing("x,, a ,\n", ["a", "b"], ", ") == "x, a, b"
    assert parse_tag_replacement("a\\;b,c\\,d") == [("a;b", "c,d")]
    with pytest.raises(UserError, match="escape a comma"):
        parse_tag_replacement("a,b,c")


@pytest.mark.parametrize("name", ["meta.json", "meta.jsonl"])
def test_output_path_writes_metadata_fine_tune_reads(tmp_path, tagger, name):
    from library.dataset.scan import read_metadata

    square(tmp_path / "img" / "red.png", RED, size=(48, 32))
    square(tmp_path / "img" / "blue.png", BLUE)
    (tmp_path / "img" / "red.txt").write_text("kept\n")
    out = tmp_path / name
    assert tag(tmp_path / "img", tagger, "--output_path", str(out)) == 0
    assert (tmp_path / "img" / "red.txt").read_text() == "kept\n"
    assert not (tmp_path / "img" / "blue.txt").exists()
    red, blue = str(tmp_path / "img" / "red.png"), str(tmp_path / "img" / "blue.png")
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows == [
            {"image_path": blue, "caption": BLUE_TAGS, "image_size": [40, 40]},
            {"image_path": red, "caption": RED_TAGS, "image_size": [48, 32]},
        ]
        assert read_metadata(out)[red]["caption"] == RED_TAGS
    else:
        assert json.loads(out.read_text()) == {
            blue: {"tags": BLUE_TAGS, "image_size": [40, 40]},
            red: {"tags": RED_TAGS, "image_size": [48, 32]},
        }
        assert read_metadata(out)[red]["tags"] == RED_TAGS
