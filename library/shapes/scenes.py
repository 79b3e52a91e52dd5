"""Procedural scenes for tiny-shapes: one coloured shape on a plain background, its caption, and the data set.

The caption grammar is exactly ``a {colour} {shape} on a {background} background``; the optional extras (off
unless a scene sets them) give ``a {size} {colour} {shape} {position phrase} on a {background} background``.
Every image is a pure function of its scene and an integer seed (size, position and rotation jitter).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from library.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 40, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""Shape colours (sRGB). The closest pair, yellow and orange, is 86 apart (Euclidean RGB)."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (30, 70, 220),
}
"""Background colours. A name shared with ``COLOURS`` is the same RGB, so a white, black or blue shape is never
drawn on a background of its own colour; every other shape colour is at least 108 away from every background."""

SHAPES = ("circle", "square", "triangle", "star")

SIZES: dict[str, tuple[float, float]] = {"small": (0.40, 0.50), "large": (0.60, 0.70)}
"""Optional size words: the range of the shape's diameter as a fraction of the image's short side. A scene
without a size word draws a diameter in 0.40-0.70."""

POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
"""Optional position words and the caption phrase each one adds after the shape."""

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96), (128, 128), (128, 96), (96, 128))
"""Image sizes (width, height) ``random_scenes`` draws from: square and both orientations, 64-128 px per side."""

SUPERSAMPLE = 4
"""Shapes are drawn at this many times the size, then box-filtered down: anti-aliased edges."""

ROTATION_JITTER_DEG = 15.0
"""Squares, triangles and stars turn by up to this many degrees either way from upright."""

HOLE_RATIO = 0.5
"""A hollow shape's hole: the same shape, this fraction of its size, in the background colour (a circle becomes a
ring). The caption grammar has no word for it, so hollow shapes are what concept datasets teach."""

STAR_INNER_RATIO = 0.45
"""A star's inner radius over its outer radius (a plump five-pointed star that stays a star when blurred)."""

EXTENT: dict[str, float] = {"circle": 1.0, "square": 1.1, "triangle": 1.15, "star": 1.15}
"""Each shape's circumscribed radius over half its drawn diameter: polygons are drawn a little larger than the
circle of that diameter so that all four shapes look about equally big (a square's side is 0.78 diameters)."""

_DIAMETER_RANGE = (0.40, 0.70)
_MARGIN = 0.04  # of the short side, kept free between the shape's circumscribed circle and the image edge
_FREE_RANGE = (0.3, 0.7)  # where the centre lands within the free room when a scene names no position
_POSITION_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.0, 0.15), _FREE_RANGE),
    "right": ((0.85, 1.0), _FREE_RANGE),
    "top": (_FREE_RANGE, (0.0, 0.15)),
    "bottom": (_FREE_RANGE, (0.85, 1.0)),
    "centre": ((0.45, 0.55), (0.45, 0.55)),
}


@dataclass(frozen=True)
class Scene:
    """One image's content and size; ``caption`` is its text. ``size``/``position`` are optional extras;
    ``hollow`` (a hole of ``HOLE_RATIO``) is outside the grammar: its caption does not mention it."""

    colour: str
    shape: str
    background: str
    width: int
    height: int
    size: str | None = None
    position: str | None = None
    hollow: bool = False

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in choices:
                raise UserError(f"scene {field} {value!r} is not one of {', '.join(choices)}; pick one of those")
        if self.size is not None and self.size not in SIZES:
            raise UserError(f"scene size {self.size!r} is not one of {', '.join(SIZES)} (or None)")
        if self.position is not None and self.position not in POSITIONS:
            raise UserError(f"scene position {self.position!r} is not one of {', '.join(POSITIONS)} (or None)")
        if COLOURS[self.colour] == BACKGROUNDS[self.background]:
            raise UserError(f"a {self.colour} shape on a {self.background} background would be invisible")
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise UserError(f"scene size {self.width}x{self.height} must be 16-4096 pixels per side")

    @property
    def caption(self) -> str:
        """``a {colour} {shape} on a {background} background``, with the optional size word and position phrase."""
        size = f"{self.size} " if self.size else ""
        position = f" {POSITIONS[self.position]}" if self.position else ""
        return f"a {size}{self.colour} {self.shape}{position} on a {self.background} background"

    @property
    def combination(self) -> tuple[str, str, str]:
        """The (colour, shape, background) triple that held-out sets are made of."""
        return (self.colour, self.shape, self.background)


def valid_combinations() -> tuple[tuple[str, str, str], ...]:
    """Every drawable (colour, shape, background) triple, in palette order (shape colour never the background's)."""
    return tuple(
        (colour, shape, background)
        for colour in COLOURS
        for shape in SHAPES
        for background in BACKGROUNDS
        if COLOURS[colour] != BACKGROUNDS[background]
    )


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of an upright square, triangle or star inscribed in a circle, turned by ``angle`` radians."""
    if shape == "square":
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [radius] * 4
    elif shape == "triangle":
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [radius] * 3
    else:
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RATIO for k in range(10)]
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a, r in zip(angles, radii, strict=True)]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, angle: float, fill
) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=fill)


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw ``scene`` as an RGB image; the diameter, centre and rotation come from a Generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    short = min(scene.width, scene.height)
    low, high = SIZES[scene.size] if scene.size else _DIAMETER_RANGE
    diameter = rng.uniform(low, high) * short
    x_range, y_range = _POSITION_RANGES[scene.position] if scene.position else (_FREE_RANGE, _FREE_RANGE)
    radius = diameter / 2 * EXTENT[scene.shape]
    margin = _MARGIN * short + radius
    cx = margin + rng.uniform(*x_range) * (scene.width - 2 * margin)
    cy = margin + rng.uniform(*y_range) * (scene.height - 2 * margin)
    angle = math.radians(rng.uniform(-ROTATION_JITTER_DEG, ROTATION_JITTER_DEG))

    s = SUPERSAMPLE
    big = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    fill = COLOURS[scene.colour]
    radius *= s
    _draw_shape(draw, scene.shape, (cx * s, cy * s), radius, angle, fill)
    if scene.hollow:
        _draw_shape(draw, scene.shape, (cx * s, cy * s), radius * HOLE_RATIO, angle, BACKGROUNDS[scene.background])
    return big.resize((scene.width, scene.height), Image.Resampling.BOX)


def random_scenes(
    count: int,
    seed: int,
    *,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    exclude: Collection[tuple[str, str, str]] = (),
    extras: bool = False,
) -> list[Scene]:
    """``count`` scenes drawn uniformly over the drawable triples not in ``exclude`` and over ``sizes``.

    With ``extras`` each scene also gets a size word and a position phrase half of the time each.
    """
    excluded = set(exclude)
    allowed = [combo for combo in valid_combinations() if combo not in excluded]
    if not allowed:
        raise UserError("every (colour, shape, background) combination is excluded; exclude fewer")
    if not sizes:
        raise UserError("random_scenes needs at least one (width, height) size")
    rng = np.random.default_rng(seed)
    size_words, position_words = list(SIZES), list(POSITIONS)
    scenes = []
    for _ in range(count):
        colour, shape, background = allowed[rng.integers(len(allowed))]
        width, height = sizes[rng.integers(len(sizes))]
        size = position = None
        if extras:
            if rng.random() < 0.5:
                size = size_words[rng.integers(len(size_words))]
            if rng.random() < 0.5:
                position = position_words[rng.integers(len(position_words))]
        scenes.append(Scene(colour, shape, background, int(width), int(height), size, position))
    return scenes


def held_out_combinations(seed: int = 0, count: int = 12) -> tuple[tuple[str, str, str], ...]:
    """A fixed set of triples kept out of training (12 of the 116 by default, about 10%).

    Chosen greedily in a seeded order, shapes in turn, so that every (colour, shape), (colour, background) and
    (shape, background) pair still occurs in the remaining training triples, and no colour or background is held
    out much more often than the others.
    """
    combos = list(valid_combinations())
    order = [combos[i] for i in np.random.default_rng(seed).permutation(len(combos))]
    remaining = set(combos)
    pairs = ((0, 1), (0, 2), (1, 2))

    def pair_count(pair: tuple[int, int], key: tuple[str, str]) -> int:
        return sum(1 for c in remaining if (c[pair[0]], c[pair[1]]) == key)

    max_colour = math.ceil(count / len(COLOURS))
    max_background = math.ceil(count / len(BACKGROUNDS))
    chosen: list[tuple[str, str, str]] = []
    stalled = 0
    while len(chosen) < count and stalled < len(SHAPES):
        shape = SHAPES[len(chosen) % len(SHAPES)] if stalled == 0 else None
        for combo in order:
            if combo not in remaining or (shape is not None and combo[1] != shape):
                continue
            if sum(c[0] == combo[0] for c in chosen) >= max_colour:
                continue
            if sum(c[2] == combo[2] for c in chosen) >= max_background:
                continue
            if all(pair_count(p, (combo[p[0]], combo[p[1]])) > 1 for p in pairs):
                chosen.append(combo)
                remaining.discard(combo)
                stalled = 0
                break
        else:
            stalled += 1
    if len(chosen) < count:
        raise UserError(f"only {len(chosen)} combinations can be held out with every pair still trained; ask fewer")
    return tuple(sorted(chosen))


def image_seed(seed: int, index: int) -> int:
    """The render seed of image ``index`` in a data set made with ``seed`` (independent streams per image)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def write_dataset(
    folder: str | Path, scenes: Sequence[Scene], seed: int, captions: Sequence[str] | None = None
) -> list[Path]:
    """Render ``scenes`` into ``folder`` as ``<index:05d>.png`` with a ``.txt`` caption each (atomic writes): the
    scene's own caption, or ``captions[index]`` when given (concept datasets caption with a trigger word)."""
    from library.io import atomic_path, atomic_write_text  # library.io imports torch: only writers need it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(scenes):
        image = render(scene, image_seed(seed, index))
        path = folder / f"{index:05d}.png"
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        atomic_write_text(path.with_suffix(".txt"), scene.caption if captions is None else captions[index])
        paths.append(path)
    return paths
