"""sd-scripts' caption and tag clean-up (finetune/clean_captions_and_tags.py): each rule on a before/after example,
then the script on a real metadata file. The expected strings were checked against sd-scripts' own functions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune import clean_captions_and_tags as script
from library.cli import run_cli
from library.prep.cleaning import clean_caption, clean_metadata, clean_tags

TAG_RULES = [
    # underscores become spaces, except in the ^_^ emoticon
    ("1girl, long_hair, ^_^, open_mouth", "1girl, long hair, ^_^, open mouth"),
    # DeepDanbooru's rating tags (and anything after the first) are dropped
    ("1girl, smile, rating:safe", "1girl, smile"),
    ("1girl, smile, rating:safe, rating:questionable", "1girl, smile"),
    # several people: two hair lengths, hair cuts, eye colours, sleeve kinds or hairstyles all go
    ("2girls, long_hair, short_hair, smile", "2girls, smile"),
    ("2girls, bob_cut, hime_cut, smile", "2girls, smile"),
    ("2girls, blue_eyes, red_eyes, smile", "2girls, smile"),
    ("multiple_boys, blue_eyes, green_eyes", "multiple boys"),
    ("2girls, long_sleeves, sleeveless, smile", "2girls, smile"),
    ("2girls, ponytail, twintails, smile", "2girls, smile"),
    # several people, two hair colours: the colours go, the one hair length stays
    ("2girls, blonde_hair, black_hair, long_hair", "2girls, long hair"),
    # one hair colour besides the length is not a conflict
    ("2girls, blonde_hair, long_hair", "2girls, blonde hair, long hair"),
    # one person: nothing conflicts
    ("1girl, blonde_hair, black_hair, blue_eyes, red_eyes", "1girl, blonde hair, black hair, blue eyes, red eyes"),
    # "multiple girls" anywhere in the list counts, and a repeated length counts as two
    ("1girl, blonde_hair, long_hair, multiple_girls, black_hair, long_hair", "1girl, multiple girls"),
    # a one-word tag (or "hair ornament") repeated at the end of a longer tag goes
    ("1girl, white_shirt, shirt, hair_ornament, red_hair_ornament", "1girl, white shirt, red hair ornament"),
    # only whole words before it count: "x-ray" is not "<word> ray"
    ("1girl, x-ray, shirt, smile", "1girl, x-ray, shirt, smile"),
    ("", ""),
]

CAPTION_RULES = [
    ("a young woman holding an umbrella", "a girl holding an umbrella"),
    ("a cartoon image of a lady and a person", "an image of a girl and a girl"),
    ("a cartoon drawing of two women", "a drawing of two girls"),
    ("a cartoon character", "a girl"),
    ("a female person", "a girl"),
    ("an anime cartoon image of a cat", "an image of a cat"),
    ("a cartoon anime drawing of a dog", "a drawing of a dog"),
    ("a cartoon figure", "a figure"),
    ("a cartoon picture", "a picture"),
    # each replacement repeats until nothing changes
    ("anime anime anime girl", "girl"),
    ("girl girl girl", "girl"),
    # plain substring replacements, as in sd-scripts: the article is not fixed and words inside words change
    ("an anime girl with people in the background", "an girl with girls in the background"),
    ("a ladybug on a leaf", "a girlbug on a leaf"),
]


DOC = Path(__file__).resolve().parents[1] / "docs" / "clean_captions_and_tags.md"


def doc_examples(heading: str) -> list[tuple[str, str]]:
    """(before, after) from the table rows under ``heading``: the last two back-quoted cells of each row."""
    section = DOC.read_text(encoding="utf-8").split(heading, 1)[1].split("\n#", 1)[0]
    rows = [re.findall(r"`([^`]*)`", line) for line in section.splitlines() if line.startswith("| ")]
    return [(cells[-2], cells[-1]) for cells in rows if len(cells) >= 2]


def test_doc_examples_are_the_tested_ones():
    assert sorted(doc_examples("### Tag rules")) == sorted((b, a) for b, a in TAG_RULES if b)
    assert sorted(doc_examples("### Caption rules")) == sorted(CAPTION_RULES)


@pytest.mark.parametrize("before, after", TAG_RULES)
def test_tag_rules(before, after):
    assert clean_tags(before) == after


@pytest.mark.parametrize("before, after", CAPTION_RULES)
def test_caption_rules(before, after):
    assert clean_caption(before) == after


def test_clean_metadata_counts_and_reports_changes():
    metadata = {
        "a": {"caption": "a woman", "tags": "1girl, long_hair", "train_resolution": [512, 512]},
        "b": {"caption": "a cat"},
        "c": {"tags": "cat"},
    }
    seen = []
    report = clean_metadata(metadata, "m.json", lambda key, before, after: seen.append((key, before, after)))
    assert metadata == {
        "a": {"caption": "a girl", "tags": "1girl, long hair", "train_resolution": [512, 512]},
        "b": {"caption": "a cat"},
        "c": {"tags": "cat"},
    }
    assert seen == [("a", "1girl, long_hair", "1girl, long hair"), ("a", "a woman", "a girl")]
    assert (report.entries, report.tags_changed, report.captions_changed) == (3, 1, 1)
    assert (report.without_tags, report.without_caption) == (["b"], ["c"])


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_script_cleans_in_place(tmp_path, capsys):
    meta = _write(tmp_path / "meta.json", {"img": {"caption": "a woman", "tags": "2girls, blue_eyes, red_eyes"}})
    assert run_cli(script.main, [str(meta), str(meta)]) == 0
    assert json.loads(meta.read_text(encoding="utf-8")) == {"img": {"caption": "a girl", "tags": "2girls"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    assert (
        f"clean captions and tags: 1 entries, 1 tags and 1 captions changed, 0 without tags, 0 without a caption; "
        f"written to {meta}" in capsys.readouterr().err
    )


def test_script_accepts_the_old_three_argument_form(tmp_path, capsys):
    meta = _write(tmp_path / "in.json", {"img": {"tags": "cat_ears"}})
    out = tmp_path / "out.json"
    assert run_cli(script.main, [str(tmp_path), str(meta), str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == {"img": {"tags": "cat ears"}}
    assert json.loads(meta.read_text(encoding="utf-8")) == {"img": {"tags": "cat_ears"}}
    assert "the first (train_data_dir) is no longer used" in capsys.readouterr().err


def test_script_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert run_cli(script.main, [str(missing), str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err == f"error: in_json {missing}: metadata file not found; check the path\n"
    bad = _write(tmp_path / "bad.json", {"img": {"tags": ["a", "b"]}})
    assert run_cli(script.main, [str(bad), str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: 'img': 'tags' must be a string, got list\n"
    assert json.loads(bad.read_text(encoding="utf-8")) == {"img": {"tags": ["a", "b"]}}
    assert not (tmp_path / "out.json").exists()
