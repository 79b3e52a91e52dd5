"""The CLIP BPE tokenizer shipped with the package, so single-file models work offline."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 77


def packaged_tokenizer_dir() -> Path:
    return Path(str(resources.files("library") / "data" / "clip-tokenizer"))


def load_packaged_tokenizer(v2: bool = False) -> CLIPTokenizer:
    """SD1's tokenizer (pads with ``<|endoftext|>``) or SD2's (same BPE, pads with ``!``, id 0)."""
    folder = packaged_tokenizer_dir()
    kwargs = {"pad_token": "!"} if v2 else {}
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH, **kwargs)
