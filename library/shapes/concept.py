"""A concept tiny-shapes has never seen, for the example LoRA and the learning tests: an orange ring, captioned
``a sks circle on a {background} background``. The caption grammar has no word for a hole, so the base model
draws solid circles of any colour for ``sks``; a LoRA that learned the concept draws orange rings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from library.shapes import scenes as shapes
from library.shapes.evaluate import Judgement, judge


@dataclass(frozen=True)
class Concept:
    """A trigger word standing for a (hollow) shape of one colour; ``class_word`` is the shape's grammar word."""

    trigger: str = "sks"
    colour: str = "orange"
    class_word: str = "circle"
    hollow: bool = True

    def caption(self, background: str) -> str:
        return f"a {self.trigger} {self.class_word} on a {background} background"

    def scene(self, background: str, width: int, height: int) -> shapes.Scene:
        return shapes.Scene(self.colour, self.class_word, background, width, height, hollow=self.hollow)

    def matches(self, verdict: Judgement) -> bool:
        """Whether a judged image shows the concept: its colour and its hole. The outline is not judged: a
        generated ring is often lumpy enough for the evaluator to read three or four lobes in it, and the base
        model never draws a hole in any shape."""
        return verdict.colour == self.colour and verdict.hollow == self.hollow


RING = Concept()
"""The example's concept: an orange ring (``examples/dataset/20_sks circle``)."""

CONCEPT_BACKGROUNDS = ("white", "black", "gray", "blue")


def concept_scenes(concept: Concept, count: int, seed: int) -> list[shapes.Scene]:
    """``count`` scenes of ``concept`` over every background and the default image sizes, in a seeded order."""
    rng = np.random.default_rng(seed)
    sizes = shapes.DEFAULT_SIZES
    return [
        concept.scene(CONCEPT_BACKGROUNDS[i % len(CONCEPT_BACKGROUNDS)], *sizes[int(rng.integers(len(sizes)))])
        for i in range(count)
    ]


def write_concept_dataset(folder: str | Path, concept: Concept, count: int, seed: int) -> list[Path]:
    """Render ``count`` images of ``concept`` with trigger-word captions into ``folder`` (see ``write_dataset``)."""
    scenes = concept_scenes(concept, count, seed)
    return shapes.write_dataset(folder, scenes, seed, [concept.caption(s.background) for s in scenes])


def concept_score(images: Iterable[Image.Image], concept: Concept = RING) -> float:
    """The fraction of ``images`` that show ``concept`` (colour and hole judged right, ``Concept.matches``)."""
    verdicts = [judge(image) for image in images]
    return sum(concept.matches(v) for v in verdicts) / len(verdicts) if verdicts else 0.0


def _triple(prompt: str) -> tuple[str, str, str] | None:
    """The (colour, shape, background) a grammar caption names, or None for any other text."""
    words = prompt.split()
    if len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background":
        triple = (words[1], words[2], words[5])
        if triple[0] in shapes.COLOURS and triple[1] in shapes.SHAPES and triple[2] in shapes.BACKGROUNDS:
            return triple
    return None


def mean_change(before: Image.Image, after: Image.Image) -> float:
    """Mean absolute pixel difference (0-255) of two samples of one prompt and seed."""
    a = np.asarray(before.convert("RGB"), dtype=np.float64)
    b = np.asarray(after.convert("RGB").resize(before.size), dtype=np.float64)
    return float(np.abs(a - b).mean())


def concept_report(manifest: dict, concept: Concept = RING) -> list[str]:
    """Report lines scoring a run's sample grid (``library.engine.report`` manifest): for prompts with the trigger
    word, the share of samples showing ``concept`` at the first and the last sample point; for grammar prompts
    without it (controls), the share the evaluator judges right and the mean pixel change (0-255)."""
    first_step, last_step = manifest["steps"][0], manifest["steps"][-1]
    trigger: dict[str, list[Image.Image]] = {"first": [], "last": []}
    control: dict[str, list] = {"first": [], "last": [], "change": []}
    for row in manifest["rows"]:
        cells = row["samples"]
        if cells[0] is None or cells[-1] is None:
            continue
        first, last = Image.open(cells[0]["path"]), Image.open(cells[-1]["path"])
        if concept.trigger in row["prompt"].replace(",", " ").split():
            trigger["first"].append(first)
            trigger["last"].append(last)
        elif (triple := _triple(row["prompt"])) is not None:
            control["first"].append(shows(judge(first), triple))
            control["last"].append(shows(judge(last), triple))
            control["change"].append(mean_change(first, last))
    lines = []
    if trigger["first"]:
        lines.append(
            f"concept ({concept.colour} {'hollow ' if concept.hollow else ''}{concept.class_word}, "
            f"'{concept.trigger}'): {concept_score(trigger['first'], concept):.0%} of {len(trigger['first'])} "
            f"samples at step {first_step}, {concept_score(trigger['last'], concept):.0%} at step {last_step}"
        )
    if control["first"]:
        count = len(control["first"])
        lines.append(
            f"control prompts: judged right in {sum(control['first']) / count:.0%} of {count} samples at step "
            f"{first_step}, {sum(control['last']) / count:.0%} at step {last_step}; mean pixel change "
            f"{sum(control['change']) / count:.1f} / 255"
        )
    return lines


def shows(verdict: Judgement, triple: tuple[str, str, str]) -> bool:
    """Whether a judged image is the grammar's (colour, shape, background): that solid shape, not hollow."""
    return (verdict.colour, verdict.shape, verdict.background) == triple and not verdict.hollow
