"""tiny-shapes' scene generator (captions, deterministic rendering, held-out triples, data set files) and its
evaluator (colour, background and shape judged right on clean and on blurred, noisy renders)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from library.errors import UserError
from library.shapes.evaluate import Judgement, judge, score
from library.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_SIZES,
    SHAPES,
    Scene,
    held_out_combinations,
    image_seed,
    random_scenes,
    render,
    valid_combinations,
    write_dataset,
)

HELD_OUT_SEED_0 = (
    ("blue", "circle", "gray"),
    ("blue", "star", "gray"),
    ("green", "circle", "white"),
    ("green", "square", "white"),
    ("orange", "triangle", "blue"),
    ("orange", "triangle", "white"),
    ("purple", "star", "blue"),
    ("purple", "triangle", "black"),
    ("red", "square", "black"),
    ("red", "star", "black"),
    ("white", "circle", "gray"),
    ("white", "square", "blue"),
)


def test_caption_grammar_and_optional_extras():
    assert Scene("red", "circle", "white", 64, 64).caption == "a red circle on a white background"
    assert Scene("purple", "star", "gray", 96, 64).caption == "a purple star on a gray background"
    assert Scene("red", "circle", "white", 64, 64, "small", "left").caption == (
        "a small red circle on the left on a white background"
    )
    assert (
        Scene("blue", "star", "gray", 64, 64, position="top").caption == "a blue star at the top on a gray background"
    )
    assert Scene("black", "square", "blue", 64, 64, size="large").caption == "a large black square on a blue background"


def test_palette_and_impossible_pairs():
    assert len(COLOURS) >= 8 and len(BACKGROUNDS) >= 4 and SHAPES == ("circle", "square", "triangle", "star")
    closest = min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(COLOURS.values(), 2))
    assert round(closest) == 86  # yellow and orange
    combos = valid_combinations()
    assert len(combos) == 8 * 4 * 4 - 3 * 4 == 116  # white, black and blue shapes never on their own background
    with pytest.raises(UserError, match="white shape on a white background would be invisible"):
        Scene("white", "circle", "white", 64, 64)
    with pytest.raises(UserError, match="scene colour 'pink' is not one of red"):
        Scene("pink", "circle", "white", 64, 64)
    with pytest.raises(UserError, match="scene position 'middle'"):
        Scene("red", "circle", "white", 64, 64, position="middle")


def test_render_is_deterministic_sized_and_uses_the_palette():
    scene = Scene("orange", "star", "blue", 96, 64)
    first, again, other = render(scene, 5), render(scene, 5), render(scene, 6)
    assert first.size == (96, 64) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    pixels = np.asarray(first).reshape(-1, 3)
    colours = {tuple(int(v) for v in p) for p in pixels}
    assert BACKGROUNDS["blue"] in colours and COLOURS["orange"] in colours
    border = np.concatenate([np.asarray(first)[0], np.asarray(first)[-1]])
    assert (border == BACKGROUNDS["blue"]).all()  # the shape keeps its margin off the edge


def test_random_scenes_deterministic_exclude_and_sizes():
    held = held_out_combinations()
    scenes = random_scenes(600, 3, exclude=held)
    assert scenes == random_scenes(600, 3, exclude=held)
    assert scenes != random_scenes(600, 4, exclude=held)
    assert not {s.combination for s in scenes} & set(held)
    assert all(COLOURS[s.colour] != BACKGROUNDS[s.background] for s in scenes)
    assert {(s.width, s.height) for s in scenes} == set(DEFAULT_SIZES)
    assert all(s.size is None and s.position is None for s in scenes)
    extras = random_scenes(200, 3, extras=True)
    assert {s.size for s in extras} == {None, "small", "large"}
    assert len({s.position for s in extras}) == 6
    with pytest.raises(UserError, match="every .* combination is excluded"):
        random_scenes(1, 0, exclude=valid_combinations())


def test_held_out_set_is_fixed_and_leaves_every_word_and_pair_in_training():
    held = held_out_combinations()
    assert held == HELD_OUT_SEED_0
    assert held_out_combinations(seed=1) != held
    training = set(valid_combinations()) - set(held)
    assert len(training) == 104
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert {(c[i], c[j]) for c in held} <= {(c[i], c[j]) for c in training}
    assert {c[0] for c in training} == set(COLOURS)
    assert {c[1] for c in training} == set(SHAPES)
    assert {c[2] for c in training} == set(BACKGROUNDS)
    assert sorted(sum(c[1] == s for c in held) for s in SHAPES) == [3, 3, 3, 3]


def test_write_dataset_files(tmp_path):
    scenes = random_scenes(3, 1)
    paths = write_dataset(tmp_path / "data", scenes, seed=9)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        [f"0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    )
    for index, (path, scene) in enumerate(zip(paths, scenes, strict=True)):
        assert path.with_suffix(".txt").read_text() == scene.caption
        with Image.open(path) as image:
            assert image.tobytes() == render(scene, image_seed(9, index)).tobytes()
    assert image_seed(9, 0) != image_seed(9, 1) != image_seed(10, 1)


def _degrade(image: Image.Image, seed: int) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    pixels += np.random.default_rng(seed).normal(0.0, 10.0, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def rendered() -> tuple[list[Scene], list[Image.Image]]:
    scenes = random_scenes(400, 7)
    return scenes, [render(scene, i) for i, scene in enumerate(scenes)]


def test_judge_clean_renders(rendered):
    scenes, images = rendered
    assert {s.shape for s in scenes} == set(SHAPES) and len({(s.width, s.height) for s in scenes}) == 6
    assert score(images, scenes) == {"colour": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}


def test_judge_blurred_noisy_renders(rendered):
    scenes, images = rendered
    degraded = [_degrade(image, i) for i, image in enumerate(images)]
    assert score(degraded, scenes) == {"colour": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}


def test_judge_blank_specks_and_mismatches():
    assert judge(Image.new("RGB", (64, 64), BACKGROUNDS["white"])) == Judgement(None, None, "white")
    specks = np.full((64, 96, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    specks[10, 10] = specks[40, 70] = COLOURS["red"]
    assert judge(Image.fromarray(specks)) == Judgement(None, None, "gray")
    image = render(Scene("green", "triangle", "black", 64, 64), 0)
    assert judge(image) == Judgement("green", "triangle", "black")
    wrong = [Scene("green", "square", "black", 64, 64), Scene("red", "triangle", "black", 64, 64)]
    assert score([image, image], wrong) == {"colour": 0.5, "shape": 0.5, "background": 1.0, "all": 0.0}


def test_judge_unmixes_heavy_blur_from_the_background():
    # blurred with radius 3, a small yellow star on black has a median colour of about (141, 125, 23): nearer
    # orange (245, 130, 20) than yellow, yet every pixel is a blend of yellow and black
    image = render(Scene("yellow", "star", "black", 64, 64, size="small"), 0).filter(ImageFilter.GaussianBlur(3))
    assert judge(image) == Judgement("yellow", "star", "black")


def test_hollow_shapes_render_a_hole_and_are_judged_hollow():
    """A hollow scene has background pixels at its centre and the same outline as the solid one; the evaluator
    says hollow for it (also blurred) and never for a solid shape."""
    for shape in SHAPES:
        solid = render(Scene("orange", shape, "gray", 96, 96), 5)
        hollow = render(Scene("orange", shape, "gray", 96, 96, hollow=True), 5)
        a, b = np.asarray(solid, dtype=int), np.asarray(hollow, dtype=int)
        changed = np.abs(a - b).sum(axis=2) > 0
        inside = np.abs(a - np.asarray(BACKGROUNDS["gray"])).sum(axis=2) > 0
        assert changed.sum() > 100 and not (changed & ~inside).any()  # the hole lies within the solid shape
        assert (b[changed] == BACKGROUNDS["gray"]).all(axis=1).mean() > 0.5  # and is background but at its edge
        for image in (hollow, hollow.filter(ImageFilter.GaussianBlur(1.0))):
            assert judge(image) == Judgement("orange", shape, "gray", True), shape
        assert judge(solid).hollow is False


def test_concept_dataset_captions_and_score(tmp_path):
    from library.shapes.concept import RING, concept_scenes, concept_score, write_concept_dataset

    paths = write_concept_dataset(tmp_path, RING, 8, 0)
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    assert captions[:4] == [f"a sks circle on a {b} background" for b in ("white", "black", "gray", "blue")]
    assert all(s.hollow and s.colour == "orange" for s in concept_scenes(RING, 8, 0))
    rings = [Image.open(p) for p in paths]
    assert concept_score(rings) == 1.0
    solid = [render(Scene("orange", "circle", "white", 64, 64), i) for i in range(3)]
    other = [render(Scene("red", "circle", "white", 64, 64, hollow=True), 0)]
    assert concept_score(solid + other + rings[:4]) == 0.5


def test_concept_report_scores_first_and_last_sample_points(tmp_path):
    """The report reads a run's grid manifest: trigger rows by the concept, control rows by their caption."""
    from library.shapes.concept import concept_report

    def saved(scene: Scene, name: str) -> str:
        path = tmp_path / f"{name}.png"
        render(scene, 1).save(path)
        return str(path)

    ring = saved(Scene("orange", "circle", "white", 64, 64, hollow=True), "ring")
    solid = saved(Scene("green", "circle", "white", 64, 64), "solid")
    square = saved(Scene("green", "square", "black", 64, 64), "square")
    wrong = saved(Scene("red", "square", "black", 64, 64), "wrong")
    rows = [
        ("a sks circle on a white background", solid, ring),
        ("a sks circle on a gray background", solid, solid),
        ("a green square on a black background", square, square),
        ("a green square on a black background", square, wrong),
        ("a photo of a frog", solid, solid),
    ]
    manifest = {
        "steps": [0, 100],
        "rows": [{"prompt": p, "samples": [{"step": 0, "path": a}, {"step": 100, "path": b}]} for p, a, b in rows],
    }
    first, second = concept_report(manifest)
    assert first == "concept (orange hollow circle, 'sks'): 0% of 2 samples at step 0, 50% at step 100"
    change = np.abs(np.asarray(Image.open(square), float) - np.asarray(Image.open(wrong), float)).mean() / 2
    assert second == (
        f"control prompts: judged right in 100% of 2 samples at step 0, 50% at step 100; mean pixel change "
        f"{change:.1f} / 255"
    )
