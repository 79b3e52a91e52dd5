"""A tiny CLIPSeg model with random weights and its processor, saved to a folder that ``--model`` accepts, for
tests, docs and benchmarks (the real ``CIDAS/clipseg-rd64-refined`` is 600 MB and needs the network)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    ViTImageProcessor,
)

from library.text.tokenizer import load_packaged_tokenizer

IMAGE_SIZE = 32  # the model's input side and the side of its logits (patch 8 -> a 4x4 grid, decoded back to 32x32)


def make_tiny_clipseg(folder: Path, seed: int = 0) -> Path:
    """Save a random-weight CLIPSeg (two-layer text and vision towers, 32 px input) with its processor to
    ``folder``; return ``folder``."""
    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
        extract_layers=(0, 1),
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=load_packaged_tokenizer())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
