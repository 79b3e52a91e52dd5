"""Which tags a WD14 tagger's probabilities become and in what order, as sd-scripts' tag_images_by_wd14_tagger.py
writes them; pure functions, no I/O, so every ordering flag can be checked exactly.

The tag table is SmilingWolf's ``selected_tags.csv``: one row per model output, category 9 = rating, 0 = general,
4 = character (other categories are ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from library.errors import UserError

RATING, GENERAL, CHARACTER = "9", "0", "4"


@dataclass(frozen=True)
class TagTable:
    """The model's outputs by position: ``names[i]`` (after renaming) and ``categories[i]`` ("9", "0", "4", …)."""

    names: tuple[str, ...]
    categories: tuple[str, ...]


@dataclass(frozen=True)
class TagOptions:
    """The flags that decide which tags are kept and their order."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: frozenset[str] = frozenset()
    always_first_tags: tuple[str, ...] = ()
    character_tags_first: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False


def split_tags(text: str, separator: str) -> list[str]:
    """A tag list typed on the command line or read from a tag file: split on the separator without its spaces
    (``", "`` splits on ``","``), each tag stripped, empty ones dropped."""
    mark = separator.strip() or separator
    return [t.strip() for t in text.split(mark) if t.strip()]


def parse_tag_replacement(text: str) -> list[tuple[str, str]]:
    """``--tag_replacement`` ``source,target;source2,target2``; ``\\,`` and ``\\;`` stand for a literal comma and
    semicolon inside a tag."""
    comma, semicolon = "\x00", "\x01"
    escaped = text.replace("\\,", comma).replace("\\;", semicolon)
    pairs = []
    for item in escaped.split(";"):
        parts = item.split(",")
        if len(parts) != 2:
            shown = item.replace(comma, "\\,").replace(semicolon, "\\;")
            raise UserError(
                f"--tag_replacement {text!r}: {shown!r} is not `source,target`; separate pairs with `;` and escape a "
                "comma or semicolon inside a tag as `\\,` or `\\;`"
            )
        source, target = (p.replace(comma, ",").replace(semicolon, ";") for p in parts)
        pairs.append((source, target))
    return pairs


def expand_character_tag(name: str, separator: str) -> str:
    """``--character_tag_expand``: ``chara_name_(series)`` -> ``chara_name<separator>series``; only the last
    parenthesis is split off (``name_(costume)_(series)`` -> ``name_(costume)<separator>series``)."""
    if not name.endswith(")") or "(" not in name:
        return name
    head, _, series = name.rpartition("(")
    return head.removesuffix("_") + separator + series.replace(")", "")


def remove_underscore(name: str) -> str:
    """``--remove_underscore``: underscores become spaces, except in tags of 3 characters or fewer (``^_^``)."""
    return name.replace("_", " ") if len(name) > 3 else name


def rename_tags(
    table: TagTable,
    separator: str,
    character_tag_expand: bool = False,
    underscores_to_spaces: bool = False,
    replacements: Sequence[tuple[str, str]] = (),
) -> TagTable:
    """The table with sd-scripts' renaming applied in its order: character expansion, underscores, then each
    replacement (an exact match of the whole tag)."""
    names = []
    for name, category in zip(table.names, table.categories):
        if character_tag_expand and category == CHARACTER:
            name = expand_character_tag(name, separator)
        if underscores_to_spaces:
            name = remove_underscore(name)
        for source, target in replacements:
            if name == source:
                name = target
        names.append(name)
    return TagTable(tuple(names), table.categories)


def select_tags(probs: Sequence[float], table: TagTable, options: TagOptions) -> list[str]:
    """One image's tags in sd-scripts' order: general and character tags at or above their thresholds in table
    order; with ``character_tags_first`` each character tag is moved to the front as it is found (so they end up
    in reverse table order); the most likely rating first (``use_rating_tags``) or last
    (``use_rating_tags_as_last_tag``); finally each ``always_first_tags`` tag present is moved to the front in turn
    (the last listed ends first). Undesired tags are never output."""
    if len(probs) != len(table.names):
        raise ValueError(f"{len(probs)} probabilities for {len(table.names)} tags")
    tags: list[str] = []
    best_rating: tuple[float, str] | None = None
    for p, name, category in zip(probs, table.names, table.categories):
        if category == RATING:
            if best_rating is None or p > best_rating[0]:
                best_rating = (float(p), name)
            continue
        if name in options.undesired_tags:
            continue
        if category == GENERAL and p >= options.general_threshold:
            tags.append(name)
        elif category == CHARACTER and p >= options.character_threshold:
            if options.character_tags_first:
                tags.insert(0, name)
            else:
                tags.append(name)
    wants_rating = options.use_rating_tags or options.use_rating_tags_as_last_tag
    if wants_rating and best_rating is not None and best_rating[1] not in options.undesired_tags:
        if options.use_rating_tags:
            tags.insert(0, best_rating[1])
        else:
            tags.append(best_rating[1])
    for tag in options.always_first_tags:
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def merge_with_existing(existing_text: str, new_tags: Sequence[str], separator: str) -> str:
    """``--append_tags``: the tags already in a tag file followed by the new ones it lacks, so running it twice
    gives the same file."""
    existing = split_tags(existing_text.strip("\n"), separator)
    return separator.join(existing + [t for t in new_tags if t not in existing])
