"""sd-scripts' clean-up of fine-tuning metadata (``finetune/clean_captions_and_tags.py``) as pure functions.

Tags (from a tagger) lose underscores, DeepDanbooru's trailing rating, per-person attributes that contradict each
other when several people are in the picture, and single-word tags repeated inside a longer tag. Captions (from
BLIP or GIT) have words for women, people and cartoon figures rewritten to "girl"/"girls". See
docs/clean_captions_and_tags.md for each rule with an example.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import UserError
from library.prep.metadata import read_metadata_json, write_metadata

logger = logging.getLogger("sdtrain.prep")

SEP = ", "
EMOTICON = "^_^"  # the one tag whose underscore is kept
RATING_SPLIT = ", rating"  # DeepDanbooru appends "rating:safe" etc. after the tags

HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
HAIR_CUT = re.compile(r", (bob|hime) cut, ")
HAIR_ANY = re.compile(r", ([\w\-]+) hair, ")
SINGLE_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
PLACEHOLDER = ", @@@, "

# attributes that belong to one person: with several people, two or more of a kind cannot all be right
PER_PERSON = (
    HAIR_LENGTH,
    HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(
        r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|two tails|"
        r"[\w\-]+ braid|sidelocks), "
    ),
)

# applied in this order, each until the caption no longer changes
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def underscores_to_spaces(tags: str) -> str:
    """Danbooru tag names use ``_`` for spaces; the ``^_^`` emoticon keeps its underscore."""
    return EMOTICON.join(part.replace("_", " ") for part in tags.split(EMOTICON))


def drop_rating(tags: str) -> tuple[str, int]:
    """Everything before DeepDanbooru's first ``, rating…`` tag, and how many rating tags there were."""
    parts = tags.split(RATING_SPLIT)
    return parts[0], len(parts) - 1


def padded(tags: str) -> str:
    """Each tag framed by its own ``", "`` on both sides (``a, b`` -> ``", a, , b, "``), so that a pattern
    ``", X, "`` matches every tag, neighbours included."""
    return SEP + tags.replace(SEP, SEP + SEP) + SEP


def unpadded(framed: str) -> str:
    """Undo :func:`padded` after tags were taken out."""
    collapsed = framed.replace(SEP + SEP, SEP)
    return collapsed[len(SEP) : -len(SEP)]


def is_group(framed: str) -> bool:
    """Several people in the picture: any tag text containing ``girls`` or ``boys`` (``2girls``, ``multiple boys``)."""
    return "girls" in framed or "boys" in framed


def drop_conflicting(framed: str) -> str:
    """With several people: remove every tag of a per-person kind (hair length, hair cut, eye colour, sleeves,
    hairstyle) that occurs twice or more, then every ``<X> hair`` tag if two or more remain (a hair length left
    over, the same for everyone, is kept)."""
    for pattern in PER_PERSON:
        if len(pattern.findall(framed)) > 1:
            framed = pattern.sub("", framed)
    length = HAIR_LENGTH.search(framed)
    if length:
        framed = HAIR_LENGTH.sub(PLACEHOLDER, framed)
    if len(HAIR_ANY.findall(framed)) > 1:
        framed = HAIR_ANY.sub("", framed)
    if length:
        framed = framed.replace(PLACEHOLDER, length.group())
    return framed


def drop_repeated_words(framed: str) -> str:
    """Remove a one-word tag (or ``hair ornament``) when a longer tag ends with it: ``shirt`` goes when
    ``white shirt`` is there."""
    for word in SINGLE_WORD.findall(framed):
        if re.search(rf", ((\w+) )+{word}, ", framed):
            framed = framed.replace(f"{SEP}{word}{SEP}", "")
    return framed


def clean_tags(tags: str, image_key: str = "") -> str:
    """All tag rules in sd-scripts' order: underscores, rating, group conflicts, repeated words."""
    tags, ratings = drop_rating(underscores_to_spaces(tags))
    if ratings > 1:
        logger.info("%s: %d rating tags; everything after the first was dropped", image_key, ratings)
    framed = padded(tags)
    if is_group(framed):
        framed = drop_conflicting(framed)
    return unpadded(drop_repeated_words(framed))


def clean_caption(caption: str) -> str:
    """Apply each (old, new) substring replacement in order, repeating it until the caption no longer changes."""
    for old, new in CAPTION_REPLACEMENTS:
        while old in caption:
            caption = caption.replace(old, new)
    return caption


@dataclass
class CleanReport:
    """What cleaning a metadata dict did: entries, fields changed, and keys lacking tags or a caption."""

    entries: int = 0
    tags_changed: int = 0
    captions_changed: int = 0
    without_tags: list[str] = field(default_factory=list)
    without_caption: list[str] = field(default_factory=list)

    def summary(self, where: str) -> str:
        return (
            f"clean captions and tags: {self.entries} entries, {self.tags_changed} tags and "
            f"{self.captions_changed} captions changed, {len(self.without_tags)} without tags, "
            f"{len(self.without_caption)} without a caption; written to {where}"
        )


def clean_metadata(
    metadata: dict[str, dict], source: str, on_change: Callable[[str, str, str], None] | None = None
) -> CleanReport:
    """Clean every entry's ``tags`` and ``caption`` in place; ``on_change(key, before, after)`` sees each change.
    A field that is present but not a string is a UserError naming ``source`` and the key."""
    report = CleanReport(entries=len(metadata))
    for key, entry in metadata.items():
        for name, cleaner, missing in (
            ("tags", lambda text, k=key: clean_tags(text, k), report.without_tags),
            ("caption", clean_caption, report.without_caption),
        ):
            before = entry.get(name)
            if before is None:
                missing.append(key)
                continue
            if not isinstance(before, str):
                raise UserError(f"{source}: '{key}': '{name}' must be a string, got {type(before).__name__}")
            after = cleaner(before)
            if after != before:
                entry[name] = after
                if name == "tags":
                    report.tags_changed += 1
                else:
                    report.captions_changed += 1
                if on_change is not None:
                    on_change(key, before, after)
    return report


@dataclass(frozen=True)
class CleanJob:
    """Which metadata file to clean and where to write the result (the same file is fine)."""

    in_json: Path
    out_json: Path
    debug: bool = False


def clean_metadata_file(job: CleanJob) -> CleanReport:
    """Read, clean and atomically write the metadata, then log the summary line."""
    metadata = read_metadata_json(job.in_json, "in_json")

    def show(key: str, before: str, after: str) -> None:
        logger.info("%s\n  from: %s\n  to:   %s", key, before, after)

    report = clean_metadata(metadata, str(job.in_json), show if job.debug else None)
    for name, keys in (("tags", report.without_tags), ("caption", report.without_caption)):
        if keys:
            more = ", ..." if len(keys) > 5 else ""
            logger.warning("%d entries have no %s: %s%s", len(keys), name, ", ".join(keys[:5]), more)
    write_metadata(job.out_json, metadata)
    logger.info(report.summary(str(job.out_json)))
    return report
