"""State-dict key conversion between the original LDM single-file layout and diffusers / transformers layouts.

The mappings are derived from each model's diffusers config (number of blocks, layers per block, which blocks have
attention), so any channel width or depth converts, not only SD 1.5's. Conversions rename keys and reshape the few
tensors whose layout differs (1x1 convolutions against linear layers, OpenCLIP's fused q/k/v projection); values are
never changed, so a round trip is bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"))
_UNET_RESNET += (("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_OPENCLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
OPENCLIP_TOP = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.weight", "ln_final.weight"),
    ("final_layer_norm.bias", "ln_final.bias"),
)
"""(transformers CLIP name, OpenCLIP name) of the tensors outside the layers, shared by SD 2.x and SDXL's bigG."""

Pairs = list[tuple[str, str]]


def _per_block(value: Any, count: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * count


def _resnet_pairs(diffusers: str, ldm: str, renames: tuple[tuple[str, str], ...]) -> Pairs:
    return [(diffusers, ldm)] + [(f"{diffusers}.{d}", f"{ldm}.{m}") for d, m in renames]


def unet_module_pairs(config: Mapping[str, Any]) -> Pairs:
    """(diffusers module path, LDM module path) for every module of a UNet with this config."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    n = len(down_types)
    layers = _per_block(config["layers_per_block"], n)
    pairs: Pairs = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text and size embedding
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            pairs += _resnet_pairs(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET)
            if "CrossAttn" in block_type:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    pairs += _resnet_pairs("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += _resnet_pairs("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    index = 0
    for i, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        count = list(reversed(layers))[i] + 1
        for j in range(count):
            pairs += _resnet_pairs(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET)
            if has_attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
            if j == count - 1 and i < n - 1:
                pairs.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{index}.{2 if has_attention else 1}"))
            index += 1
    return pairs


def vae_module_pairs(config: Mapping[str, Any]) -> Pairs:
    """(diffusers module path, LDM module path) for every module of an AutoencoderKL with this config."""
    n = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    resnet = (("conv_shortcut", "nin_shortcut"),)
    pairs: Pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out")]
        pairs.append((f"{part}.conv_norm_out", f"{part}.norm_out"))
        pairs += _resnet_pairs(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", resnet)
        pairs += _resnet_pairs(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", resnet)
        pairs += _resnet_pairs(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(n):
        for j in range(layers):
            pairs += _resnet_pairs(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", resnet)
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"))
        level = n - 1 - i
        for j in range(layers + 1):
            pairs += _resnet_pairs(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", resnet)
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{level}.upsample"))
    return pairs


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: Pairs, what: str) -> dict[str, torch.Tensor]:
    """Rename each key by its longest module prefix found in ``pairs`` (from -> to)."""
    table = dict(pairs)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = table.get(".".join(parts[:cut]))
            if target is not None:
                out[".".join([target, *parts[cut:]])] = value
                break
        else:
            raise KeyError(f"{what}: unexpected key {key!r} for this model configuration")
    return out


def _swap(pairs: Pairs) -> Pairs:
    return [(b, a) for a, b in pairs]


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> ``model.diffusion_model.*`` keys (projections keep their Linear/conv shape)."""
    renamed = _rename(state_dict, unet_module_pairs(config), "UNet")
    return {UNET_PREFIX + k: v for k, v in renamed.items()}


def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` keys of a checkpoint -> diffusers UNet state dict for ``config``.

    ``proj_in``/``proj_out`` are reshaped to what ``use_linear_projection`` asks for (SD1 files store 1x1 convs,
    SD2 files Linear weights).
    """
    renamed = _rename(_strip(checkpoint, UNET_PREFIX), _swap(unet_module_pairs(config)), "UNet")
    linear = bool(config.get("use_linear_projection", False))
    for key, value in renamed.items():
        if ".attentions." in key and key.rsplit(".", 2)[-2] in ("proj_in", "proj_out") and key.endswith(".weight"):
            renamed[key] = _as_linear(value) if linear else _as_conv(value)
    return renamed


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = VAE_PREFIX):
    """diffusers AutoencoderKL state dict -> LDM VAE keys (mid-block attention as 1x1 convs)."""
    renamed = _rename(state_dict, vae_module_pairs(config), "VAE")
    return {prefix + k: _as_conv(v) if _is_vae_attention_weight(k) else v for k, v in renamed.items()}


def vae_from_ldm(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = VAE_PREFIX):
    """LDM VAE keys (under ``prefix``; ``""`` for a VAE-only file) -> diffusers AutoencoderKL state dict."""
    ldm = _strip(checkpoint, prefix) if prefix else dict(checkpoint)
    ldm = {k: v for k, v in ldm.items() if not k.startswith("loss.")}
    renamed = _rename(ldm, _swap(vae_module_pairs(config)), "VAE")
    return {
        k: _as_linear(v) if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") else v
        for k, v in renamed.items()
    }


def _is_vae_attention_weight(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and ldm_key.split(".")[-2] != "norm"


def _as_linear(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, 0, 0] if t.ndim == 4 else t


def _as_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


def _text_key(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


def sd1_text_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict (transformers 4 or 5 naming) -> ``cond_stage_model.transformer.text_model.*``."""
    return {SD1_TEXT_PREFIX + _text_key(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def sd1_text_from_ldm(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 text-encoder keys, with or without ``text_model.``, -> transformers 5 CLIPTextModel names."""
    out = {}
    for key, value in _strip(checkpoint, SD1_TEXT_PREFIX).items():
        name = key.removeprefix("text_model.")
        if not name.endswith("position_ids"):
            out[name] = value
    return out


def count_openclip_blocks(checkpoint: Mapping[str, torch.Tensor], prefix: str = SD2_TEXT_PREFIX) -> int:
    """Number of ``transformer.resblocks.N`` of the OpenCLIP text encoder under ``prefix`` (SD2 by default)."""
    head = prefix + "transformer.resblocks."
    return len({k[len(head) :].split(".")[0] for k in checkpoint if k.startswith(head)})


def openclip_block_to_clip(checkpoint: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One OpenCLIP resblock (keys under ``src``) as a transformers CLIP encoder layer (under ``dst``), the fused
    ``attn.in_proj_*`` split into q/k/v."""
    out = {}
    for ours, theirs in _OPENCLIP_LAYER:
        for kind in ("weight", "bias"):
            out[f"{dst}{ours}.{kind}"] = checkpoint[f"{src}{theirs}.{kind}"]
    for kind in ("weight", "bias"):
        for name, part in zip("qkv", checkpoint[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)):
            out[f"{dst}self_attn.{name}_proj.{kind}"] = part
    return out


def clip_layer_to_openclip(
    state_dict: Mapping[str, torch.Tensor], src: str, dst: str, copy: bool = False
) -> dict[str, torch.Tensor]:
    """One transformers CLIP encoder layer (keys under ``src``) as an OpenCLIP resblock (under ``dst``), q/k/v
    fused into ``attn.in_proj_*``; ``copy`` clones the tensors (a layer written twice must not share storage)."""
    out = {}
    for ours, theirs in _OPENCLIP_LAYER:
        for kind in ("weight", "bias"):
            out[f"{dst}{theirs}.{kind}"] = _copy_if(state_dict[f"{src}{ours}.{kind}"], copy)
    for kind in ("weight", "bias"):
        qkv = [state_dict[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    return out


def sd2_text_to_ldm(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel (SD2, penultimate-layer) state dict -> OpenCLIP keys under ``cond_stage_model.model.``.

    SD2 files hold one more resblock than the diffusers model (SD2 conditions on the penultimate layer); as
    sd-scripts does, the last layer is written as a copy of the one before, with a ``text_projection`` of ones and a
    ``logit_scale``, so the file has the standard layout.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    p = SD2_TEXT_PREFIX
    out = {p + theirs: sd[ours] for ours, theirs in OPENCLIP_TOP}
    for i in range(num_layers + 1):
        src, dst = f"encoder.layers.{min(i, num_layers - 1)}.", f"{p}transformer.resblocks.{i}."
        out.update(clip_layer_to_openclip(sd, src, dst, copy=i == num_layers))
    width = out[p + "ln_final.weight"].shape[0]
    dtype = out[p + "ln_final.weight"].dtype
    out[p + "text_projection"] = torch.ones((width, width), dtype=dtype)
    out[p + "logit_scale"] = torch.tensor(1.0, dtype=dtype)
    return out


def _copy_if(t: torch.Tensor, copy: bool) -> torch.Tensor:
    return t.clone() if copy else t


def sd2_text_from_ldm(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP keys -> transformers 5 CLIPTextModel names, dropping the last resblock (N blocks -> N-1 layers)."""
    p = SD2_TEXT_PREFIX
    out = {ours: checkpoint[p + theirs] for ours, theirs in OPENCLIP_TOP}
    for i in range(count_openclip_blocks(checkpoint) - 1):
        out.update(openclip_block_to_clip(checkpoint, f"{p}transformer.resblocks.{i}.", f"encoder.layers.{i}."))
    return out


def text_to_ldm(state_dict: Mapping[str, torch.Tensor], v2: bool, num_layers: int) -> dict[str, torch.Tensor]:
    """An SD1 or SD2 text encoder's state dict -> its single-file keys."""
    return sd2_text_to_ldm(state_dict, num_layers) if v2 else sd1_text_to_ldm(state_dict)


def text_from_ldm(checkpoint: Mapping[str, torch.Tensor], v2: bool) -> dict[str, torch.Tensor]:
    """A single file's SD1 or SD2 text-encoder keys -> the CLIPTextModel state dict."""
    return sd2_text_from_ldm(checkpoint) if v2 else sd1_text_from_ldm(checkpoint)


def ldm_state_dict(unet, vae, text_encoder, v2: bool) -> dict[str, torch.Tensor]:
    """The whole model as one LDM single-file state dict (UNet, VAE, text encoder)."""
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    out.update(text_to_ldm(text_encoder.state_dict(), v2, text_encoder.config.num_hidden_layers))
    return out
