"""finetune/make_captions.py (BLIP) and finetune/make_captions_by_git.py (GIT) on tiny random-weight models and real
image files: captions equal what the model generates for each image when called directly, existing captions survive,
re-runs resume, corrupt images are skipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune import make_captions, make_captions_by_git
from library.cli import run_cli
from library.prep.captioning import remove_words
from tests.images import write_image
from tests.tiny_captioners import SPECIAL, WORDS, git_processor, make_tiny_blip, make_tiny_git

REPO = Path(__file__).resolve().parent.parent
IMAGES = ["a.png", "b.png", "c.jpg", "d.png"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": make_tiny_blip(root / "blip"), "git": make_tiny_git(root / "git")}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Four images of different sizes, a corrupt one and one in a sub-folder."""
    data = tmp_path / "img"
    for i, name in enumerate(IMAGES):
        write_image(data / name, size=(40 + 8 * i, 48), seed=i)
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_image(data / "sub" / "e.png", size=(36, 36), seed=9)
    return data


def load(model_dir: Path, kind: str):
    from transformers import BlipForConditionalGeneration, BlipProcessor, GitForCausalLM, GitProcessor

    if kind == "blip":
        return BlipForConditionalGeneration.from_pretrained(model_dir).eval(), BlipProcessor.from_pretrained(model_dir)
    return GitForCausalLM.from_pretrained(model_dir).eval(), GitProcessor.from_pretrained(model_dir)


def blip_reference(model_dir: Path, image: Path, **generate) -> str:
    """BLIP on one image, called directly: the ``a picture of`` prompt, generation, the prompt cut off."""
    model, processor = load(model_dir, "blip")
    inputs = processor(images=Image.open(image).convert("RGB"), text="a picture of", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids, **generate)
    text = processor.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("a picture of")
    return text[len("a picture of") :].strip()


def git_reference(model_dir: Path, image: Path, max_length: int = 50) -> str:
    model, processor = load(model_dir, "git")
    inputs = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs.pixel_values, max_length=max_length)
    return processor.decode(ids[0], skip_special_tokens=True)


def captions(folder: Path, extension: str = ".caption") -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in folder.rglob(f"*{extension}")}


def blip(folder: Path, models: dict[str, Path], *flags: str) -> int:
    return run_cli(make_captions.main, [str(folder), "--caption_weights", str(models["blip"]), *flags])


def git(folder: Path, models: dict[str, Path], *flags: str) -> int:
    return run_cli(make_captions_by_git.main, [str(folder), "--model_id", str(models["git"]), *flags])


def test_blip_beam_search_writes_each_images_caption_recursively(folder, models, capsys):
    beam = ["--beam_search", "--num_beams", "2", "--max_length", "20", "--min_length", "3"]
    assert blip(folder, models, *beam, "--batch_size", "3", "--recursive") == 0
    got = captions(folder)
    assert sorted(got) == ["a.caption", "b.caption", "c.caption", "d.caption", "sub/e.caption"]
    for name, text in got.items():
        image = folder / name.replace(".caption", ".jpg" if name == "c.caption" else ".png")
        expected = blip_reference(models["blip"], image, num_beams=2, max_length=20, min_length=3)
        assert text == expected + "\n"
    assert len(set(got.values())) > 2, "the tiny model should caption different images differently"
    err = capsys.readouterr().err
    assert "BLIP captions: 5 processed, 0 skipped (already done), 1 failed, 5 written" in err
    assert "bad.png" in err


def test_blip_sampling_is_reproducible_across_batch_sizes(folder, models, capsys):
    assert blip(folder, models, "--max_length", "24") == 0
    first = captions(folder)
    assert sorted(first) == ["a.caption", "b.caption", "c.caption", "d.caption"]
    assert blip(folder, models, "--max_length", "24", "--batch_size", "4", "--overwrite") == 0
    assert captions(folder) == first
    assert blip(folder, models, "--max_length", "24", "--seed", "7", "--overwrite") == 0
    assert captions(folder) != first
    # top_p close to 0 keeps only the likeliest token: greedy search with sampling's repetition penalty
    assert blip(folder, models, "--max_length", "24", "--top_p", "1e-9", "--overwrite", "--batch_size", "2") == 0
    greedy = blip_reference(models["blip"], folder / "b.png", max_length=24, min_length=5, repetition_penalty=1.1)
    assert captions(folder)["b.caption"] == greedy + "\n"


def test_blip_misspelt_extension_flag_and_bad_values(folder, models, capsys):
    assert blip(folder, models, "--caption_extention", "txt", "--beam_search", "--max_length", "8") == 0
    assert sorted(captions(folder, ".txt")) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    capsys.readouterr()
    assert blip(folder, models, "--top_p", "0") == 2
    assert capsys.readouterr().err.strip() == "error: --top_p 0.0: must be above 0 and at most 1"
    assert blip(folder, models, "--min_length", "9", "--max_length", "8") == 2
    assert "--min_length 9" in capsys.readouterr().err


SD_SCRIPTS_DEFAULTS = {
    # finetune/make_captions.py (caption_weights was a .pth URL there: now a transformers model)
    "blip": dict(
        caption_extention=None,
        caption_extension=".caption",
        beam_search=False,
        batch_size=1,
        max_data_loader_n_workers=None,
        num_beams=1,
        top_p=0.9,
        max_length=75,
        min_length=5,
        seed=42,
        debug=False,
        recursive=False,
    ),
    # finetune/make_captions_by_git.py
    "git": dict(
        caption_extension=".caption",
        model_id="microsoft/git-large-textcaps",
        batch_size=1,
        max_data_loader_n_workers=None,
        max_length=50,
        remove_words=False,
        debug=False,
        recursive=False,
    ),
}


@pytest.mark.parametrize("kind", ["blip", "git"])
def test_sd_scripts_flags_and_defaults(kind):
    script = make_captions if kind == "blip" else make_captions_by_git
    args = script.setup_parser().parse_args(["data"])
    assert args.train_data_dir == "data" and args.overwrite is False and args.device is None
    assert {k: getattr(args, k) for k in SD_SCRIPTS_DEFAULTS[kind]} == SD_SCRIPTS_DEFAULTS[kind]


def test_unknown_model_fails_in_one_line(folder, capsys):
    assert run_cli(make_captions.main, [str(folder), "--caption_weights", "nobody/no-such-blip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --caption_weights nobody/no-such-blip: cannot load this model id")
    assert run_cli(make_captions_by_git.main, [str(folder), "--model_id", "nobody/no-such-git"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model_id nobody/no-such-git: cannot load")
    assert not any("Traceback" in line for line in err)
    assert run_cli(make_captions.main, [str(folder), "--caption_weights", "model_large_caption.pth"]) == 2
    assert "Salesforce/blip-image-captioning-large" in capsys.readouterr().err
    assert not captions(folder)


def test_git_keeps_existing_captions_and_resumes(folder, models, capsys):
    (folder / "a.caption").write_text("my own caption\n", encoding="utf-8")
    assert git(folder, models, "--batch_size", "2") == 0
    got = captions(folder)
    assert sorted(got) == ["a.caption", "b.caption", "c.caption", "d.caption"]
    assert got["a.caption"] == "my own caption\n"
    for name in ("b.png", "c.jpg", "d.png"):
        assert got[Path(name).stem + ".caption"] == git_reference(models["git"], folder / name) + "\n"
    assert "GIT captions: 3 processed, 1 skipped (already done), 1 failed, 3 written" in capsys.readouterr().err

    (folder / "c.caption").unlink()
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*.caption")}
    assert git(folder, models) == 0
    assert "GIT captions: 1 processed, 3 skipped (already done), 1 failed, 1 written" in capsys.readouterr().err
    assert captions(folder) == got
    assert {p: p.stat().st_mtime_ns for p in before} == before

    assert git(folder, models, "--overwrite", "--batch_size", "4") == 0
    assert captions(folder)["a.caption"] == git_reference(models["git"], folder / "a.png") + "\n"
    assert "GIT captions: 4 processed, 0 skipped (already done), 1 failed, 4 written" in capsys.readouterr().err


def test_nothing_left_to_do_loads_no_model(folder, capsys):
    (folder / "bad.png").unlink()
    for name in IMAGES:
        (folder / name).with_suffix(".caption").write_text("done\n", encoding="utf-8")
    assert run_cli(make_captions_by_git.main, [str(folder), "--model_id", "nobody/not-needed"]) == 0
    assert "GIT captions: 0 processed, 4 skipped (already done), 0 failed, 0 written" in capsys.readouterr().err
    assert set(captions(folder).values()) == {"done\n"}


def test_git_max_length_and_non_recursive(folder, models):
    assert git(folder, models, "--max_length", "6", "--caption_extension", ".txt", "--batch_size", "3") == 0
    got = captions(folder, ".txt")
    assert sorted(got) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert got["d.txt"] == git_reference(models["git"], folder / "d.png", max_length=6) + "\n"
    assert len(got["d.txt"].split()) == 5  # [CLS] + 5 tokens: none of the random tokens is [SEP]
    assert len(set(got.values())) > 2


@pytest.mark.parametrize(
    "caption, expected",
    [
        ('a sign with the words "hello world" on it', "a sign "),
        ("a man holding a sign that says stop", "a man holding a sign "),
        ("a book with the number 42 on it", "a book "),
        ("a poster that says the word love on it", "a poster  "),
        ("a shirt with the name bob in red", "a shirt "),
        ("a mug that says 'i'm fine' on it", "a mug "),
        ("a cat on a mat", "a cat on a mat"),
    ],
)
def test_remove_words_matches_sd_scripts(caption, expected):
    """Expected values are sd-scripts' PATTERN_REPLACE applied to the same captions."""
    assert remove_words(caption) == expected


def test_git_remove_words_end_to_end(folder, models, tmp_path):
    """A copy of the tiny GIT whose vocabulary renames the first two tokens it generates for a.png to "that says":
    its caption then starts with a phrase --remove_words deletes (with the word after it)."""
    model, processor = load(models["git"], "git")
    inputs = processor(images=Image.open(folder / "a.png").convert("RGB"), return_tensors="pt")
    first = model.generate(pixel_values=inputs.pixel_values, max_length=4)[0, 1:3].tolist()
    assert len(set(first)) == 2
    words = list(WORDS)
    for token_id, word in zip(first, ["that", "says"]):
        words[token_id - len(SPECIAL)] = word
    renamed = tmp_path / "git-textcaps"
    shutil.copytree(models["git"], renamed)
    git_processor(renamed, words).save_pretrained(renamed)

    raw = git_reference(renamed, folder / "a.png", max_length=12)
    assert raw.startswith("that says ")
    assert run_cli(make_captions_by_git.main, [str(folder), "--model_id", str(renamed), "--max_length", "12"]) == 0
    assert captions(folder)["a.caption"] == raw + "\n"
    flags = [str(folder), "--model_id", str(renamed), "--max_length", "12", "--remove_words", "--overwrite"]
    assert run_cli(make_captions_by_git.main, flags) == 0
    assert captions(folder)["a.caption"] == " " + " ".join(raw.split()[3:]) + "\n"


def test_script_runs_as_a_program(folder, models):
    cmd = [sys.executable, "finetune/make_captions_by_git.py", str(folder), "--model_id", str(models["git"])]
    done = subprocess.run([*cmd, "--max_length", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(captions(folder)) == ["a.caption", "b.caption", "c.caption", "d.caption"]
    assert "GIT captions: 4 processed, 0 skipped (already done), 1 failed, 4 written" in done.stderr
