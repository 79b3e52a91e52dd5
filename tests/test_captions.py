"""Caption processing (sd-scripts' process_caption order) with seeded rngs: exact output strings.

Where randomness is involved the expected value is also derived independently by replaying the same draws on a
fresh ``random.Random`` with the same seed.
"""

from __future__ import annotations

import random

from library.dataset.captions import pick_caption, process_caption
from library.dataset.scan import scan_subset
from library.dataset.types import ImageRecord, SubsetConfig
from tests.images import write_image


def subset(**kw) -> SubsetConfig:
    return SubsetConfig(name="s", **kw)


def run(caption: str, s: SubsetConfig, seed: int = 0, epoch: int = 1, step: int = 0, **kw) -> str:
    return process_caption(caption, s, random.Random(seed), epoch, step, **kw)


def test_plain_caption_untouched_and_first_line_only():
    assert run("a, b,c ,  d", subset()) == "a, b,c ,  d"
    assert run("first line\nsecond line", subset()) == "first line"


def test_prefix_and_suffix():
    assert (
        run("a dog", subset(caption_prefix="photo of", caption_suffix="best quality")) == "photo of a dog best quality"
    )


def test_shuffle_all_tokens():
    reference = ["a", "b", "c", "d", "e"]
    random.Random(0).shuffle(reference)
    assert run("a, b, c, d, e", subset(shuffle_caption=True)) == "c, b, a, e, d" == ", ".join(reference)


def test_shuffle_keeps_first_tokens():
    reference = ["c", "d", "e"]
    random.Random(0).shuffle(reference)
    assert run("a,b,c,d,e", subset(shuffle_caption=True, keep_tokens=2)) == "a, b, c, e, d"
    assert ", ".join(["a", "b", *reference]) == "a, b, c, e, d"


def test_keep_tokens_separator_fixes_head_and_tail():
    s = subset(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1)
    assert run("head, h2 ||| x, y, z ||| t1, t2", s) == "head, h2, x, z, y, t1, t2"
    assert run("head ||| x, y, z", s) == "head, x, z, y"


def test_custom_caption_separator():
    s = subset(shuffle_caption=True, caption_separator=";")
    assert run("a; b; c; d; e", s) == "c, b, a, e, d"


def test_secondary_separator_joins_after_shuffle():
    assert run("x;;;y, z", subset(secondary_separator=";;;")) == "x,y, z"
    reference = ["x;;;y", "z", "w"]
    random.Random(2).shuffle(reference)
    assert reference == ["z", "w", "x;;;y"]
    assert run("x;;;y, z, w", subset(secondary_separator=";;;", shuffle_caption=True), seed=2) == "z, w, x,y"


def test_wildcards_and_escaped_braces():
    rng = random.Random(0)
    expected = f"a {rng.choice(['red', 'green', 'blue'])} {rng.choice(['ball', 'cube'])}, {{braces}}"
    got = run("a {red|green|blue} {ball|cube}, {{braces}}", subset(enable_wildcard=True))
    assert got == "a green cube, {braces}" == expected
    assert run("{a|b}", subset()) == "{a|b}"  # without enable_wildcard braces are text


def test_wildcard_multiline_caption_picks_a_line():
    lines = ["line one", "line two", "line three"]
    picks = {run("\n".join(lines), subset(enable_wildcard=True), seed=seed) for seed in range(20)}
    assert picks == set(lines)
    assert run("\n".join(lines), subset(enable_wildcard=True), seed=3) == random.Random(3).choice(lines)


def test_tag_dropout():
    rng = random.Random(1)
    reference = [t for t in "abcdefgh" if rng.random() >= 0.5]
    assert run("a, b, c, d, e, f, g, h", subset(caption_tag_dropout_rate=0.5), seed=1) == "b, c, g, h"
    assert reference == ["b", "c", "g", "h"]
    assert run("keep, a, b", subset(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "keep"


def test_caption_dropout_rate():
    got = [run("a, b", subset(caption_dropout_rate=0.5), seed=seed) for seed in range(6)]
    expected = ["" if random.Random(seed).random() < 0.5 else "a, b" for seed in range(6)]
    assert got == ["a, b", "", "a, b", "", "", "a, b"] == expected
    assert run("a, b", subset(caption_dropout_rate=1.0, caption_prefix="p")) == ""


def test_caption_dropout_every_n_epochs():
    s = subset(caption_dropout_every_n_epochs=2)
    assert [run("cap", s, epoch=e) for e in range(1, 6)] == ["cap", "", "cap", "", "cap"]


def test_token_warmup_steps_and_fraction():
    s = subset(token_warmup_step=4, token_warmup_min=1)
    got = [run("a, b, c, d, e", s, step=step) for step in range(6)]
    assert got == ["a", "a, b", "a, b, c", "a, b, c, d", "a, b, c, d, e", "a, b, c, d, e"]
    # 0.1 of 100 steps = 10 warm-up steps, from 2 tokens: step 5 -> floor(5 * 3 / 10) + 2 = 3 tokens
    frac = subset(token_warmup_step=0.1, token_warmup_min=2)
    got = [run("a, b, c, d, e", frac, step=step, max_train_steps=100) for step in (0, 5, 10)]
    assert got == ["a, b", "a, b, c", "a, b, c, d, e"]


def test_same_seed_same_caption_other_seed_differs():
    s = subset(shuffle_caption=True, caption_tag_dropout_rate=0.2, enable_wildcard=True)
    caption = "{x|y}, a, b, c, d, e, f, g"
    assert run(caption, s, seed=5) == run(caption, s, seed=5)
    assert len({run(caption, s, seed=seed) for seed in range(10)}) > 5


def test_pick_caption_from_scanned_files(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "a.caption").write_text("one\ntwo\n")
    s = SubsetConfig(name="s", image_dir=tmp_path, enable_wildcard=True, class_tokens="sks dog")
    with_caption, without = scan_subset(s, 0).records
    assert pick_caption(without, s, random.Random(0)) == "sks dog"
    picks = [pick_caption(with_caption, s, random.Random(seed)) for seed in range(4)]
    assert picks == [random.Random(seed).choice(["one", "two"]) for seed in range(4)]
    assert set(picks) == {"one", "two"}
    bare = ImageRecord(tmp_path / "b.png", (64, 64), (), 0)
    assert pick_caption(bare, SubsetConfig(name="s"), random.Random(0)) == ""
