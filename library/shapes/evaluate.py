"""Judge an image of one shape on a plain background: which background, shape colour and shape it shows.

Pure colour statistics and geometry (no learned model), so tests and docs can check what tiny-shapes draws:
the background is the palette entry nearest the border's median colour, the shape is the largest blob of pixels
far from that colour, its colour the palette entry nearest the blob's median, and its kind is read from the
harmonics of its radius as a function of angle (3 lobes: triangle, 4: square, 5: star, none: circle).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from library.shapes.scenes import BACKGROUNDS, COLOURS, Scene

FOREGROUND_DISTANCE = 60.0
"""A pixel this far (Euclidean RGB, 0-255) from the border's median colour seeds the foreground mask."""

MIN_AREA_FRACTION = 0.01
"""A foreground blob smaller than this share of the image is no shape: colour and shape are None."""

CIRCLE_HARMONIC = 0.05
"""Below this relative amplitude of the strongest 3rd/4th/5th radial harmonic, a shape is a circle."""

HOLE_FRACTION = 0.08
"""A shape whose enclosed background pixels make up this share of its filled area is hollow (a ring: 0.25)."""

RAYS = 180
"""Angles at which the shape's radius is measured."""

_LOBES = {3: "triangle", 4: "square", 5: "star"}


@dataclass(frozen=True)
class Judgement:
    """What an image shows; None where the image shows no shape. ``hollow``: the shape has a hole of background
    colour (at least ``HOLE_FRACTION`` of its area), as a ring has."""

    colour: str | None
    shape: str | None
    background: str | None
    hollow: bool = False


def _nearest(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _unmix(shape_pixels: np.ndarray, background: np.ndarray) -> str:
    """The palette colour that best explains the shape's pixels as mixtures of it and the background.

    Blur and anti-aliasing blend a shape's colour with the background (a blurred yellow on black turns orange-ish);
    fitting each pixel as ``background + share * (colour - background)``, share in 0-1, undoes that blend.
    """
    offsets = shape_pixels - background
    best, best_error = "", np.inf
    for name, rgb in COLOURS.items():
        direction = np.asarray(rgb, dtype=np.float64) - background
        length = float(direction @ direction)
        if length < FOREGROUND_DISTANCE**2:
            continue
        share = np.clip(offsets @ direction / length, 0.0, 1.0)
        error = float(np.linalg.norm(offsets - share[:, None] * direction, axis=1).mean())
        if error < best_error:
            best, best_error = name, error
    return best


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])


def _coverage(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Each pixel's share of shape colour (0 background, 1 shape; along the line between the shape's median colour
    and the background's), the shape's own pixels and the share of its filled outline that is a hole, or None
    when nothing stands out from the background."""
    distance = np.linalg.norm(pixels - background, axis=2)
    seed = distance > FOREGROUND_DISTANCE
    if seed.sum() < 3:
        return None
    labels, count = ndimage.label(seed)
    sizes = ndimage.sum_labels(seed, labels, index=np.arange(1, count + 1))
    blob = labels == 1 + int(np.argmax(sizes))
    colour = np.median(pixels[blob], axis=0)
    direction = colour - background
    share = ((pixels - background) @ direction) / float(direction @ direction)
    core = blob & (share > 0.75)
    if core.sum() >= 5:
        colour = np.median(pixels[core], axis=0)
        direction = colour - background
        share = ((pixels - background) @ direction) / float(direction @ direction)
    # keep only the blob's own neighbourhood: other specks and smudges do not count towards its outline
    labels, count = ndimage.label(share > 0.5)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(share > 0.5, labels, index=np.arange(1, count + 1))
    blob = labels == 1 + int(np.argmax(sizes))
    main = ndimage.binary_fill_holes(blob)
    near = ndimage.binary_dilation(main, iterations=2)
    hole = float((main & ~blob).sum()) / float(main.sum())
    return np.where(near, np.clip(share, 0.0, 1.0), 0.0), pixels[blob], hole


def radial_harmonics(coverage: np.ndarray) -> np.ndarray:
    """Amplitudes of the harmonics 0-8 of the shape's radius around its centroid, over the mean radius.

    The radius at each angle is the integral of ``coverage`` along the ray (sub-pixel, and it averages noise).
    """
    total = coverage.sum()
    ys, xs = np.indices(coverage.shape)
    cy, cx = (coverage * ys).sum() / total, (coverage * xs).sum() / total
    reach = float(np.hypot(*coverage.shape)) / 2 + 2
    steps = np.arange(0.0, reach, 0.5)
    angles = np.linspace(0.0, 2 * np.pi, RAYS, endpoint=False)
    rows = cy + np.sin(angles)[:, None] * steps[None, :]
    cols = cx + np.cos(angles)[:, None] * steps[None, :]
    samples = ndimage.map_coordinates(coverage, [rows.ravel(), cols.ravel()], order=1, cval=0.0)
    radius = samples.reshape(RAYS, -1).sum(axis=1) * 0.5
    spectrum = np.abs(np.fft.rfft(radius)) / RAYS
    return spectrum[:9] * np.r_[1.0, np.full(8, 2.0)] / max(spectrum[0], 1e-9)


def classify_shape(harmonics: np.ndarray) -> str:
    """The shape whose lobe count (3, 4 or 5) has the strongest radial harmonic; a circle when none stands out."""
    lobes = max(_LOBES, key=lambda k: harmonics[k])
    return _LOBES[lobes] if harmonics[lobes] >= CIRCLE_HARMONIC else "circle"


def judge(image: Image.Image) -> Judgement:
    """The background, shape colour and shape an image shows (palette names; None for a missing shape)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    background_rgb = np.median(_border(pixels), axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    found = _coverage(pixels, background_rgb)
    if found is None:
        return Judgement(None, None, background)
    coverage, shape_pixels, hole = found
    if coverage.sum() < MIN_AREA_FRACTION * coverage.size:
        return Judgement(None, None, background)
    shape = classify_shape(radial_harmonics(coverage))
    return Judgement(_unmix(shape_pixels, background_rgb), shape, background, hole >= HOLE_FRACTION)


def score(images: Iterable[Image.Image], scenes: Iterable[Scene]) -> dict[str, float]:
    """Fractions of images whose judged ``colour``, ``shape``, ``background`` and ``all`` three match the scenes."""
    hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    total = 0
    for image, scene in zip(images, scenes, strict=True):
        verdict = judge(image)
        right = {
            "colour": verdict.colour == scene.colour,
            "shape": verdict.shape == scene.shape,
            "background": verdict.background == scene.background,
        }
        right["all"] = all(right.values())
        for key, ok in right.items():
            hits[key] += ok
        total += 1
    return {key: value / total if total else 0.0 for key, value in hits.items()}
