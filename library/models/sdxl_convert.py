"""SDXL's single-file (SGM) layout: key mapping both ways and configs inferred from tensor shapes.

An SGM file (SDXL base 1.0 and its fine-tunes) holds the UNet under ``model.diffusion_model.`` (LDM names plus
``label_emb`` for the pooled-text/size embedding), CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (the
transformers names), OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (OpenCLIP names: fused q/k/v
``attn.in_proj_*`` and a ``text_projection`` applied as ``x @ P``, i.e. the transpose of a ``Linear`` weight) and
the VAE under ``first_stage_model.``. Values are only renamed, split, joined or transposed, so round trips are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from library.models.convert import (
    OPENCLIP_TOP,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_layer_to_openclip,
    count_openclip_blocks,
    openclip_block_to_clip,
    unet_to_ldm,
    vae_to_ldm,
)
from library.models.detect import infer_unet_config, infer_vae_config, max_index

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_SCALE = 0.13025
OPENCLIP_LOGIT_SCALE = math.log(100.0)
"""Written as ``logit_scale`` (OpenCLIP's trained value, ln 100); no diffusers part holds it and nothing reads it."""


def heads_for(width: int) -> int:
    """Attention heads of a layer this wide: SDXL's 64-wide heads; models narrower than 256 (tiny test models)
    use 16-wide heads. Shapes cannot tell head counts, so inference and the tiny preset share this rule."""
    return max(1, width // 64) if width >= 256 else max(1, width // 16)


def clip_l_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> ``conditioner.embedders.0.transformer.text_model.*``."""
    return {
        CLIP_L_PREFIX + "text_model." + k.removeprefix("text_model."): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


def clip_l_from_sgm(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keys of an SGM file (with or without ``text_model.``) -> transformers 5 CLIPTextModel names."""
    out = {}
    for key, value in checkpoint.items():
        if key.startswith(CLIP_L_PREFIX) and not key.endswith("position_ids"):
            out[key[len(CLIP_L_PREFIX) :].removeprefix("text_model.")] = value
    return out


def clip_g_to_sgm(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> OpenCLIP keys under ``conditioner.embedders.1.model.`` (q/k/v
    fused into ``attn.in_proj_*``, ``text_projection`` transposed, ``logit_scale`` added)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    p = CLIP_G_PREFIX
    out = {p + theirs: sd[ours] for ours, theirs in OPENCLIP_TOP}
    for i in range(num_layers):
        out.update(clip_layer_to_openclip(sd, f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."))
    projection = sd["text_projection.weight"]
    out[p + "text_projection"] = projection.T
    out[p + "logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=projection.dtype)
    return out


def clip_g_from_sgm(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT-bigG keys of an SGM file -> CLIPTextModelWithProjection names (``text_model.*`` and
    ``text_projection.weight``); ``logit_scale`` is dropped."""
    p = CLIP_G_PREFIX
    out = {f"text_model.{ours}": checkpoint[p + theirs] for ours, theirs in OPENCLIP_TOP}
    for i in range(count_openclip_blocks(checkpoint, CLIP_G_PREFIX)):
        src, dst = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        out.update(openclip_block_to_clip(checkpoint, src, dst))
    out["text_projection.weight"] = checkpoint[p + "text_projection"].T
    return out


def sgm_state_dict(unet, vae, clip_l, clip_g) -> dict[str, torch.Tensor]:
    """The whole SDXL model as one SGM single-file state dict."""
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    out.update(clip_l_to_sgm(clip_l.state_dict()))
    out.update(clip_g_to_sgm(clip_g.state_dict(), clip_g.config.num_hidden_layers))
    return out


def _text_config(width: int, layers: int, intermediate: int, positions: int, act: str, projection: int) -> dict:
    return {
        "vocab_size": 49408,
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads_for(width),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def infer_clip_l_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """CLIPTextConfig kwargs of the file's CLIP ViT-L (quick GELU, EOS padding)."""
    layers = {
        k[len(CLIP_L_PREFIX) :].removeprefix("text_model."): v
        for k, v in state_dict.items()
        if k.startswith(CLIP_L_PREFIX)
    }
    token = layers["embeddings.token_embedding.weight"]
    config = _text_config(
        int(token.shape[1]),
        max_index(layers, "encoder.layers.") + 1,
        int(layers["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        int(layers["embeddings.position_embedding.weight"].shape[0]),
        "quick_gelu",
        int(token.shape[1]),
    )
    return {**config, "vocab_size": int(token.shape[0]), "pad_token_id": 49407}


def infer_clip_g_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """CLIPTextConfig kwargs of the file's OpenCLIP ViT-bigG (GELU, ``!`` padding, projection width from
    ``text_projection``)."""
    p = CLIP_G_PREFIX
    token = state_dict[p + "token_embedding.weight"]
    config = _text_config(
        int(token.shape[1]),
        count_openclip_blocks(state_dict, CLIP_G_PREFIX),
        int(state_dict[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        int(state_dict[p + "positional_embedding"].shape[0]),
        "gelu",
        int(state_dict[p + "text_projection"].shape[1]),
    )
    return {**config, "vocab_size": int(token.shape[0]), "pad_token_id": 0}


def infer_sdxl_unet_config(state_dict: Mapping[str, torch.Tensor], pooled_width: int) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config matching an SGM UNet's shapes: per-block transformer depth, linear
    projections, ``text_time`` additional embedding whose time width is what ``label_emb`` leaves after the pooled
    text (``pooled_width``) divided over the six size numbers."""
    config = infer_unet_config(state_dict, True, False)
    p = UNET_PREFIX
    layers = int(config["layers_per_block"])
    depths = []
    for i, block_type in enumerate(config["down_block_types"]):
        head = f"{p}input_blocks.{1 + i * (layers + 1)}.1.transformer_blocks."
        depths.append(max_index(state_dict, head) + 1 if "CrossAttn" in block_type else 1)
    added = int(state_dict[p + "label_emb.0.0.weight"].shape[1])
    return {
        **config,
        "sample_size": 128,
        "attention_head_dim": [heads_for(c) for c in config["block_out_channels"]],
        "transformer_layers_per_block": depths,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (added - pooled_width) // 6,
        "projection_class_embeddings_input_dim": added,
    }


def infer_sdxl_configs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Diffusers configs by subfolder name for an SGM file."""
    clip_g = infer_clip_g_config(state_dict)
    return {
        "unet": infer_sdxl_unet_config(state_dict, clip_g["projection_dim"]),
        "vae": {**infer_vae_config(state_dict, VAE_PREFIX), "sample_size": 1024, "scaling_factor": VAE_SCALE},
        "text_encoder": infer_clip_l_config(state_dict),
        "text_encoder_2": clip_g,
    }
