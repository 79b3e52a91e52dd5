"""Tiny BLIP and GIT captioning models with random weights, saved as transformers folders (model, processor and a
small BERT WordPiece vocabulary) that the captioning scripts load like a hub download.

The weights are initialised wider than transformers' default (``initializer_range`` 0.3 for BLIP, 0.5 for GIT) so
that different images give different captions; at the default scale every image gives the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

IMAGE_SIZE = 32
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "picture", "of"] + [f"w{i}" for i in range(80)]


def write_vocab(folder: Path, words: Sequence[str] = WORDS) -> Path:
    """A WordPiece vocabulary file: BERT's special tokens, then ``words`` (ids follow the line order)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join([*SPECIAL, *words]) + "\n", encoding="utf-8")
    return path


def _vision(init: float) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        initializer_range=init,
    )


def _text(vocab_size: int, init: float) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=96,
        initializer_range=init,
    )


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A ``BlipForConditionalGeneration`` + ``BlipProcessor`` folder (32 px images, ~0.3 MB); BLIP decodes from a
    ``[DEC]`` start token added to the vocabulary, like Salesforce's models."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    tokenizer = BertTokenizer(str(write_vocab(folder)), model_max_length=96)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = _text(len(tokenizer), 0.3) | dict(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    config = BlipConfig(text_config=text, vision_config=_vision(0.3), projection_dim=32, initializer_range=0.3)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    images = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def git_processor(folder: Path, words: Sequence[str] = WORDS):
    """A ``GitProcessor`` (CLIP image processor at 32 px, BERT tokenizer over ``words``)."""
    from transformers import BertTokenizer, CLIPImageProcessorPil, GitProcessor

    tokenizer = BertTokenizer(str(write_vocab(folder, words)), model_max_length=96)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return GitProcessor(image_processor=images, tokenizer=tokenizer)


def make_tiny_git(folder: Path, seed: int = 1) -> Path:
    """A ``GitForCausalLM`` + ``GitProcessor`` folder (~0.3 MB); generation starts at ``[CLS]`` and stops at
    ``[SEP]``, as in Microsoft's GIT models."""
    from transformers import GitConfig, GitForCausalLM

    processor = git_processor(folder)
    tokenizer = processor.tokenizer
    config = GitConfig(
        vision_config=_vision(0.5),
        **_text(len(tokenizer), 0.5),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
