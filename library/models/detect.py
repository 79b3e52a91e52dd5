"""What kind of model a single file or diffusers folder holds: family, prediction type and diffusers configs.

Shapes give channel widths, depths, attention placement and text-encoder width; head counts and group-norm sizes
cannot be read from shapes, so SD's rules are used unless the file carries the exact configs we write ourselves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from library.errors import UserError
from library.models.convert import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, count_openclip_blocks
from library.models.family import ModelFamily, checkpoint_family, diffusers_family

if TYPE_CHECKING:
    from library.models.components import Components

logger = logging.getLogger(__name__)

CONFIG_KEY = "sd_trainer.diffusers_configs"
"""Safetensors metadata key (and plain string entry of a ckpt dict) holding our exact configs as JSON."""

_PRIVATE_TEXT_KEYS = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


@dataclass(frozen=True)
class ModelInfo:
    """What the weights of one model say about it; ``v_parameterization`` is None when they cannot tell.

    ``configs`` are diffusers configs by subfolder name: ``unet``, ``vae`` and the family's text encoders."""

    family: ModelFamily
    v_parameterization: bool | None
    configs: dict[str, dict[str, Any]]
    exact: bool = False
    evidence: list[str] = field(default_factory=list)


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without bookkeeping entries (``_class_name``, versions), JSON-friendly."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def text_config_dict(config) -> dict[str, Any]:
    """A CLIPTextConfig as plain kwargs that rebuild the same config."""
    return {k: v for k, v in clean_config(config.to_dict()).items() if k not in _PRIVATE_TEXT_KEYS}


def configs_json(components: Components) -> str:
    """The exact diffusers configs of a model, stored in files we write so a model round-trips exactly."""
    c = components
    payload = {
        "v2": c.family.v2,
        "prediction_type": c.prediction_type,
        "unet": clean_config(c.unet.config),
        "vae": clean_config(c.vae.config),
    }
    for folder, text_encoder in zip(c.family.text_encoder_folders, c.text_encoders):
        payload[folder] = text_config_dict(text_encoder.config)
    return json.dumps(payload, sort_keys=True)


def detect_single_file(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> ModelInfo:
    """Inspect a single-file state dict (and its metadata); raise UserError if no family claims it."""
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in state_dict:
        raise UserError(
            f"{source}: not a Stable Diffusion 1.x/2.x/XL checkpoint (no '{UNET_PREFIX}*' UNet keys); "
            "pass a full model file, a diffusers folder or a Hugging Face model id"
        )
    stored = stored_configs(metadata, source)
    found = checkpoint_family(state_dict.keys())
    if found is None:
        raise UserError(
            f"{source}: no text encoder weights ('{SD1_TEXT_PREFIX}*', '{SD2_TEXT_PREFIX}*' or "
            "'conditioner.embedders.*') found; pass a full model file with its text encoders"
        )
    family, family_evidence = found
    evidence = [family_evidence]
    v_pred, why = _prediction_from(state_dict, metadata, stored)
    if why:
        evidence.append(why)
    if "ztsnr" in state_dict:
        evidence.append("'ztsnr' key: trained with zero terminal SNR (add --zero_terminal_snr to train it so)")
    parts = ("unet", "vae", *family.text_encoder_folders)
    if stored is not None:
        missing = [part for part in parts if not isinstance(stored.get(part), dict)]
        if missing:
            raise UserError(f"{source}: metadata '{CONFIG_KEY}' lacks {', '.join(missing)}; remove it or re-save")
        return ModelInfo(family, v_pred, {part: stored[part] for part in parts}, True, evidence)
    try:
        configs = family.infer_configs(state_dict, v_pred)
    except (KeyError, IndexError) as e:
        raise UserError(
            f"{source}: unsupported or incomplete {family.description} layout (missing "
            f"{e.args[0] if e.args else e}); check that the file is complete"
        ) from e
    return ModelInfo(family, v_pred, configs, False, evidence)


def stored_configs(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """Our exact configs if the file carries them (see ``configs_json``)."""
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
        if not all(isinstance(stored.get(k), dict) for k in ("unet", "vae", "text_encoder")):
            raise ValueError("missing unet/vae/text_encoder")
    except (ValueError, AttributeError) as e:
        raise UserError(f"{source}: metadata '{CONFIG_KEY}' is not valid ({e}); remove it or re-save the model") from e
    return stored


def _prediction_from(state_dict, metadata, stored) -> tuple[bool | None, str]:
    if stored is not None and stored.get("prediction_type") in ("epsilon", "v_prediction"):
        return stored["prediction_type"] == "v_prediction", f"'{CONFIG_KEY}' metadata"
    if "v_pred" in state_dict:
        return True, "'v_pred' key (ComfyUI)"
    prediction = metadata.get("modelspec.prediction_type", "").strip().lower()
    if prediction in ("v", "v_prediction", "v-prediction"):
        return True, f"modelspec.prediction_type={prediction}"
    if prediction in ("epsilon", "eps"):
        return False, f"modelspec.prediction_type={prediction}"
    architecture = metadata.get("modelspec.architecture", "").split("/")[0].strip().lower()
    if architecture.startswith("stable-diffusion-v"):
        return architecture.endswith("-v"), f"modelspec.architecture={architecture}"
    return None, ""


def max_index(state_dict: Mapping[str, torch.Tensor], head: str) -> int:
    """The largest N of keys ``head + "N.…"`` (-1 when there is none)."""
    indices = [int(k[len(head) :].split(".")[0]) for k in state_dict if k.startswith(head)]
    return max(indices, default=-1)


def _norm_groups(channels: list[int]) -> int:
    """32 as in SD; the largest power of two that divides every width for models too narrow for 32."""
    groups = 32
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups


def infer_unet_config(state_dict: Mapping[str, torch.Tensor], v2: bool, v_pred: bool | None) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config matching the LDM UNet tensors' shapes."""
    p = UNET_PREFIX
    downsamplers = sorted(
        int(k[len(p + "input_blocks.") :].split(".")[0])
        for k in state_dict
        if k.startswith(p + "input_blocks.") and k.endswith(".0.op.weight")
    )
    last_input = max_index(state_dict, p + "input_blocks.")
    layers = (downsamplers[0] - 1) if downsamplers else last_input
    levels = len(downsamplers) + 1
    channels, attention = [], []
    for i in range(levels):
        first = 1 + i * (layers + 1)
        channels.append(int(state_dict[f"{p}input_blocks.{first}.0.in_layers.2.weight"].shape[0]))
        attention.append(f"{p}input_blocks.{first}.1.proj_in.weight" in state_dict)
    up_attention = [f"{p}output_blocks.{i * (layers + 1)}.1.proj_in.weight" in state_dict for i in range(levels)]
    cross_key = next((k for k in state_dict if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    proj_key = next((k for k in state_dict if k.startswith(p) and k.endswith(".proj_in.weight")), None)
    blocks_head = f"{p}input_blocks.1.1.transformer_blocks."
    heads: Any = [max(1, c // 64) for c in channels] if v2 else 8
    return {
        "sample_size": 96 if (v2 and v_pred) else 64,
        "in_channels": int(state_dict[p + "input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(state_dict[p + "out.2.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": _norm_groups(channels),
        "cross_attention_dim": int(state_dict[cross_key].shape[1]) if cross_key else (1024 if v2 else 768),
        "attention_head_dim": heads,
        "use_linear_projection": bool(proj_key is not None and state_dict[proj_key].ndim == 2),
        "transformer_layers_per_block": max(1, max_index(state_dict, blocks_head) + 1),
    }


def infer_vae_config(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """A diffusers AutoencoderKL config matching LDM VAE tensors (under ``prefix``)."""
    p = prefix
    if f"{p}encoder.conv_in.weight" not in state_dict or f"{p}encoder.down.0.block.0.conv1.weight" not in state_dict:
        raise KeyError("no LDM VAE keys")
    levels = max_index(state_dict, p + "encoder.down.") + 1
    channels = [int(state_dict[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    return {
        "in_channels": int(state_dict[p + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state_dict[p + "decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": max_index(state_dict, p + "encoder.down.0.block.") + 1,
        "latent_channels": int(state_dict[p + "post_quant_conv.weight"].shape[0]),
        "norm_num_groups": _norm_groups(channels),
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def infer_text_config(state_dict: Mapping[str, torch.Tensor], v2: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs for the file's text encoder (SD2: one layer fewer than the file's resblocks)."""
    if v2:
        p = SD2_TEXT_PREFIX
        token = state_dict[p + "token_embedding.weight"]
        positions = state_dict[p + "positional_embedding"].shape[0]
        layers = count_openclip_blocks(state_dict) - 1
        intermediate = state_dict[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = state_dict.get(p + "text_projection")
    else:
        p = SD1_TEXT_PREFIX + (
            "text_model." if f"{SD1_TEXT_PREFIX}text_model.final_layer_norm.weight" in state_dict else ""
        )
        token = state_dict[p + "embeddings.token_embedding.weight"]
        positions = state_dict[p + "embeddings.position_embedding.weight"].shape[0]
        layers = max_index(state_dict, p + "encoder.layers.") + 1
        intermediate = state_dict[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = None
    width = int(token.shape[1])
    return {
        "vocab_size": int(token.shape[0]),
        "hidden_size": width,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(layers),
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": int(positions),
        "hidden_act": "gelu" if v2 else "quick_gelu",
        "projection_dim": int(projection.shape[1]) if projection is not None and projection.ndim == 2 else width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def shapes_agree(inferred: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    """True when a reference config has the layout that shapes gave (so its head counts / groups can be used)."""
    keys = [k for k in inferred if k not in ("norm_num_groups", "attention_head_dim", "sample_size", "scaling_factor")]
    return all(_same(inferred[k], reference.get(k)) for k in keys)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return list(a) == list(b)
    return a == b


def resolve_flags(
    family: ModelFamily, info_v_pred: bool | None, v2: bool | None, v_parameterization: bool | None, source: str
) -> bool:
    """The prediction type from what the weights say and the ``--v2`` / ``--v_parameterization`` flags (None =
    not given).

    The weights decide the family (another one cannot be loaded from them); the prediction type follows the flag
    when given. A flag that contradicts the weights is logged as a warning.
    """
    if v2 is not None and v2 != family.v2:
        said = family.description
        logger.warning(
            "%s: --v2 is %s but the weights are %s; loading them as %s", source, "set" if v2 else "off", said, said
        )
    if v_parameterization is not None:
        if info_v_pred is not None and info_v_pred != v_parameterization:
            logger.warning(
                "%s: --v_parameterization is %s but the model says it is %s-prediction; using the flag",
                source,
                "set" if v_parameterization else "off",
                "v" if info_v_pred else "epsilon",
            )
        return v_parameterization
    if info_v_pred is None and family.v2:
        logger.warning(
            "%s: cannot tell whether this SD 2.x model is v-prediction; assuming epsilon "
            "(pass --v_parameterization for 768-v models)",
            source,
        )
    return bool(info_v_pred)


def detect_diffusers(configs: Mapping[str, Mapping[str, Any] | None], source: str) -> tuple[ModelFamily, bool | None]:
    """Family and prediction type of a diffusers model from its ``config.json`` contents by subfolder name (the
    scheduler's ``scheduler_config.json`` under ``scheduler``; a missing one is None)."""
    present = {name: config for name, config in configs.items() if config is not None}
    family = diffusers_family(present)
    if family is None:
        raise UserError(f"{source}: not a model of any known family ({', '.join(sorted(present))} configs)")
    prediction = present.get("scheduler", {}).get("prediction_type")
    return family, (prediction == "v_prediction") if prediction in ("epsilon", "v_prediction") else None
