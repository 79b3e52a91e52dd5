"""Checked numbers: the allowed range of each numeric setting, shared by command-line flags and TOML keys.

A setting that is both a flag and a dataset TOML key (``--keep_tokens`` / ``keep_tokens``) has one range here, so
the two can never disagree. NaN and infinity are refused everywhere a number is read.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """An int or float setting's allowed values: ``low``/``high`` bounds, each inclusive unless marked open."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The rule in words, e.g. 'a number from 0 to 1' or 'a whole number of at least 1'."""
        what = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{what} from {_text(self.low)} to {_text(self.high)}"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_text(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_text(self.high)}")
        if not parts:
            return f"{what} (not NaN or infinity)"
        rule = " and ".join(parts)
        return f"{what} {'of ' if rule.startswith('at') else ''}{rule}"

    def check(self, value: Any) -> int | float:
        """``value`` converted to ``kind``; ValueError (with :meth:`describe`) when it is not allowed."""
        if isinstance(value, bool):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be {self.describe()}, got {value!r} (NaN and infinity are not allowed)")
        if self.kind is int:
            if not number.is_integer():
                raise ValueError(f"must be {self.describe()}, got {value!r}")
            number = int(number) if not isinstance(value, int) else value
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if too_low or too_high:
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        return number

    def argtype(self):
        """An argparse ``type=`` that applies :meth:`check` to the flag's text."""

        def parse(text: str) -> int | float:
            try:
                return self.check(text.strip() if isinstance(text, str) else text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        parse.__name__ = self.kind.__name__
        parse.range = self  # type: ignore[attr-defined]  # config files check TOML values with it directly
        return parse


def range_of(kind: Any) -> Range | None:
    """The :class:`Range` behind an argparse ``type=`` made by :meth:`Range.argtype`, else None."""
    found = getattr(kind, "range", None)
    return found if isinstance(found, Range) else None


def _text(bound: float) -> str:
    """A bound as people write it: 4294967295, not 4.29497e+09; 0.5 stays 0.5."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


PROBABILITY = Range(float, 0.0, 1.0)
NON_NEGATIVE_INT = Range(int, 0)
POSITIVE_INT = Range(int, 1)
NON_NEGATIVE = Range(float, 0.0)
POSITIVE = Range(float, 0.0, low_open=True)
ANY_NUMBER = Range(float)
SEED = Range(int, 0, 2**32 - 1)

# Settings that are both a flag and a dataset TOML key: one range each.
DATASET_RANGES: dict[str, Range] = {
    "num_repeats": Range(float, 0.0, 1e6, low_open=True),
    "dataset_repeats": Range(float, 0.0, 1e6, low_open=True),
    "batch_size": Range(int, 1, 1e6),
    "keep_tokens": NON_NEGATIVE_INT,
    "caption_dropout_rate": PROBABILITY,
    "caption_dropout_every_n_epochs": NON_NEGATIVE_INT,
    "caption_tag_dropout_rate": PROBABILITY,
    "token_warmup_min": NON_NEGATIVE_INT,
    "token_warmup_step": NON_NEGATIVE,
    "min_bucket_reso": POSITIVE_INT,
    "max_bucket_reso": POSITIVE_INT,
    "bucket_reso_steps": POSITIVE_INT,
    "prior_loss_weight": NON_NEGATIVE,
    "validation_split": Range(float, 0.0, 1.0, high_open=True),
    "validation_seed": Range(int, 0, 2**32 - 1),
}
