"""Per-sample caption processing with sd-scripts' semantics (``BaseDataset.process_caption``).

Order: caption dropout decision, prefix/suffix, wildcard line and ``{a|b}`` choice (else first line), then - only when
shuffling, token warm-up or tag dropout is on - split into fixed head / flexible middle / fixed tail tokens, warm-up
truncation, shuffle, tag dropout, join with ", "; finally the secondary separator becomes the caption separator.
All randomness comes from the ``rng`` passed in, so a seeded rng gives the same caption every time.
"""

from __future__ import annotations

import math
import random
import re

from library.dataset.types import ImageRecord, SubsetConfig

_WILDCARD = re.compile(r"\{([^}]+)\}")


def pick_caption(record: ImageRecord, subset: SubsetConfig, rng: random.Random) -> str:
    """The raw caption of one sample: one of the image's candidate captions, or the subset's class tokens.

    Several candidates exist only with ``enable_wildcard`` (one per non-empty line of the caption file); one is
    chosen at random. Without any caption the class tokens (or "") are used, as sd-scripts does.
    """
    if not record.captions:
        return subset.class_tokens or ""
    if len(record.captions) == 1:
        return record.captions[0]
    return rng.choice(record.captions)


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then replace each ``{a|b|c}`` by one choice; ``{{``/``}}`` are literal."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tokens(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail): by ``keep_tokens_separator`` when present, else ``keep_tokens``."""
    sep = subset.caption_separator
    keep_sep = subset.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        head, flex = caption.split(keep_sep, 1)
        tail: list[str] = []
        if keep_sep in flex:
            flex, tail_part = flex.split(keep_sep, 1)
            tail = [t.strip() for t in tail_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in head.split(sep) if t.strip()]
        return fixed, [t.strip() for t in flex.split(sep) if t.strip()], tail
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if subset.keep_tokens > 0:
        return tokens[: subset.keep_tokens], tokens[subset.keep_tokens :], []
    return [], tokens, []


def warmup_steps(subset: SubsetConfig, max_train_steps: int | None) -> int:
    """``token_warmup_step`` in steps: values below 1 are a fraction of ``max_train_steps`` (sd-scripts)."""
    if subset.token_warmup_step < 1:
        return math.floor(subset.token_warmup_step * (max_train_steps or 0))
    return int(subset.token_warmup_step)


def process_caption(
    caption: str,
    subset: SubsetConfig,
    rng: random.Random,
    epoch: int,
    step: int,
    *,
    max_train_steps: int | None = None,
) -> str:
    """The caption a sample is trained with at ``epoch`` (1-based, as sd-scripts counts) and global ``step``.

    ``max_train_steps`` is needed only when ``token_warmup_step`` is a fraction (< 1) of the run.
    """
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""

    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        fixed, flex, tail = _split_tokens(caption, subset)
        warmup = warmup_steps(subset, max_train_steps)
        if warmup and step < warmup:
            count = math.floor(step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
            flex = flex[:count]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + tail)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


CHANGING_CAPTION_KEYS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_step",
    "enable_wildcard",
)


def changing_caption_key(subset: SubsetConfig) -> str | None:
    """The first setting of ``subset`` that makes its captions change between steps (shuffle, dropout, token
    warm-up, wildcards), or None when each image always gets the same caption."""
    return next((key for key in CHANGING_CAPTION_KEYS if getattr(subset, key)), None)


def fixed_caption(record: ImageRecord, subset: SubsetConfig) -> str:
    """The caption ``record`` is trained with at every step, for a subset with no ``changing_caption_key``."""
    if changing_caption_key(subset) is not None:
        raise ValueError(f"{subset.name}: captions change between steps ({changing_caption_key(subset)})")
    rng = random.Random(0)  # unused: nothing random is on
    return process_caption(pick_caption(record, subset, rng), subset, rng, epoch=1, step=0)
