"""Every command of docs/dataset_prep.md runs as written, in order, from a folder holding ``train_images/`` (with a
corrupt image and captions to find), ``originals/`` and a single-file ``model.safetensors``; only the captioning,
tagging and segmentation models are swapped for tiny local ones and the sizes and lengths cut to test scale. Each
step's output is then checked where the page says it goes."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli import run_cli
from library.models.save import save_model
from library.models.tiny import make_tiny_model
from tests.conftest import REPO
from tests.images import write_image
from tests.tiny_captioners import make_tiny_blip, make_tiny_git
from tests.tiny_clipseg import make_tiny_clipseg
from tests.tiny_tagger import make_tiny_tagger

PAGE = REPO / "docs" / "dataset_prep.md"
TEST_SCALE = {
    "--max_resolution": {"512,512": "128,128", "512x512,384x384": "64x64,48x48"},
    "--min_bucket_reso": {"256": "64"},
    "--max_bucket_reso": {"1024": "128"},
    "--resolution": {"512": "128"},
    "--max_train_epochs": {"4": "1"},
}


def page_commands() -> list[list[str]]:
    """The words of each command in the page's ``bash`` blocks, in page order."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def script_main(path: str):
    """``main`` of a script named by its path from the repository root (``finetune/x.py`` -> ``finetune.x``)."""
    return importlib.import_module(path.removesuffix(".py").replace("/", ".")).main


def at_test_scale(words: list[str], models: dict[str, Path]) -> list[str]:
    """The command's arguments with sizes cut to test scale and the hub models swapped for the tiny local ones."""
    args = list(words)
    for i, word in enumerate(args[:-1]):
        if word in TEST_SCALE and args[i + 1] in TEST_SCALE[word]:
            args[i + 1] = TEST_SCALE[word][args[i + 1]]
    extra = {
        "make_captions.py": ["--caption_weights", str(models["blip"])],
        "make_captions_by_git.py": ["--model_id", str(models["git"])],
        "tag_images_by_wd14_tagger.py": ["--repo_id", str(models["tagger"])],
        "make_masks.py": ["--model", str(models["clipseg"])],
    }.get(Path(words[0]).name, [])
    return args[1:] + extra


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "blip": make_tiny_blip(root / "blip"),
        "git": make_tiny_git(root / "git"),
        "tagger": make_tiny_tagger(root / "tagger"),
        "clipseg": make_tiny_clipseg(root / "clipseg"),
    }


def write_inputs(root: Path) -> list[str]:
    """train_images/ (4 images of mixed sizes, one corrupt file), originals/ (2 images with a caption) and the
    tiny SD1 model as model.safetensors; returns the stems of the good training images."""
    stems = ["frog_a", "frog_b", "frog_c", "frog_d"]
    sizes = [(96, 64), (64, 96), (64, 64), (80, 80)]
    for i, (stem, size) in enumerate(zip(stems, sizes)):
        write_image(root / "train_images" / f"{stem}.png", size=size, seed=i)
    (root / "train_images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    write_image(root / "originals" / "big.jpg", size=(160, 120), seed=9)
    (root / "originals" / "big.txt").write_text("a frog\n")
    save_model(make_tiny_model(), root / "model.safetensors", "safetensors")
    return stems


def test_every_command_of_the_page_runs_and_writes_what_it_says(tmp_path, models, monkeypatch):
    stems = write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = page_commands()
    assert [Path(w[2] if w[0] == "accelerate" else w[1]).name for w in commands] == [
        "make_captions.py",
        "tag_images_by_wd14_tagger.py",
        "merge_captions_to_metadata.py",
        "merge_dd_tags_to_metadata.py",
        "clean_captions_and_tags.py",
        "prepare_buckets_latents.py",
        "fine_tune.py",
        "make_masks.py",
        "train_network.py",
        "resize_images_to_resolution.py",
    ]
    for words in commands:
        if words[:2] == ["accelerate", "launch"]:
            words = words[2:]
        assert words[0] == "python" or words[0].endswith(".py"), words
        words = words[1:] if words[0] == "python" else words
        assert run_cli(script_main(words[0]), at_test_scale(words, models)) == 0, words

    images = tmp_path / "train_images"
    for stem in stems:
        assert (images / f"{stem}.caption").read_text().strip()
        assert (images / f"{stem}.txt").read_text().strip()
        assert Image.open(images / f"{stem}-masklabel.png").mode == "L"
        with np.load(images / f"{stem}.npz") as npz:
            assert npz["latents"].shape[0] == 4
    assert not (images / "broken.caption").exists() and not (images / "broken.txt").exists()
    meta = json.loads((tmp_path / "meta_lat.json").read_text())
    assert sorted(meta) == stems
    for stem in stems:
        assert meta[stem]["caption"] and meta[stem]["tags"]
        width, height = meta[stem]["train_resolution"]
        with np.load(images / f"{stem}.npz") as npz:
            assert npz["latents"].shape[1:] == (height // 8, width // 8)
    assert (tmp_path / "output" / "my_finetune.safetensors").is_file()
    assert (tmp_path / "output" / "my_lora.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "train_images_small").iterdir()) == [
        "big+48x48.png",
        "big+48x48.txt",
        "big+64x64.png",
        "big+64x64.txt",
        "big.txt",
    ]
