"""The SDXL family: CLIP ViT-L and OpenCLIP ViT-bigG text encoders, pooled-text and size conditioning, SGM files.

Text conditioning follows sd-scripts' ``strategy_sdxl``: each encoder's penultimate hidden state (no final layer
norm) joined along the width, and the pooled vector is ViT-bigG's ``text_projection`` of the final-layer-normed
state at the first EOS token, from the first 75-token chunk. The UNet also sees six size numbers per sample, its
``time_ids``: original (h, w), crop (top, left) and target (h, w), read from the batch (``family.size_batch`` makes
them for sampling).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.models.convert import UNET_PREFIX, unet_from_ldm, vae_from_ldm
from library.models.family import Conditioning, ModelFamily
from library.models.sdxl_convert import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    clip_g_from_sgm,
    clip_l_from_sgm,
    infer_sdxl_configs,
    sgm_state_dict,
)
from library.models.tiny import sd_scheduler, tiny_sdxl_text_encoder_configs, tiny_sdxl_unet_config, tiny_vae_config
from library.text.encode import TextEncodingSettings, TokenCache, merge_chunks
from library.text.tokenizer import MAX_LENGTH, load_packaged_tokenizer

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from library.models.components import Components

SIZE_KEYS = ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw")
"""The batch entries SDXL's size conditioning reads: per sample an (h, w), a (top, left) and an (h, w) pair."""


def time_ids(batch: Mapping[str, Any] | None, count: int) -> torch.Tensor:
    """``(count, 6)`` float size numbers (original h, w, crop top, left, target h, w) from a batch's size entries."""
    if batch is None or any(key not in batch for key in SIZE_KEYS):
        raise ValueError(
            f"SDXL conditioning needs the batch entries {', '.join(SIZE_KEYS)} "
            "(training batches carry them; for sampling pass library.models.family.size_batch(height, width, n))"
        )
    columns = [torch.as_tensor(batch[key], dtype=torch.float32).reshape(-1, 2) for key in SIZE_KEYS]
    ids = torch.cat(columns, dim=1)
    if ids.shape[0] != count:
        raise ValueError(f"SDXL size entries hold {ids.shape[0]} samples but there are {count} captions")
    return ids


def _first_eos_states(states: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each row's state at its first EOS token (row 0 when it has none), as sd-scripts' pooling workaround."""
    index = (ids == eos_id).int().argmax(dim=1).to(states.device)
    return states[torch.arange(states.shape[0], device=states.device), index]


@dataclass(frozen=True)
class SDXLTextEncoding:
    """Captions to SDXL conditioning (see the module docstring); ``--clip_skip`` has no effect, as in sd-scripts."""

    settings: TextEncodingSettings
    caches: tuple[TokenCache, TokenCache] | None = None

    def _tokens(self, index: int, tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = TokenCache(max_prompts=len(captions) + 1) if self.caches is None else self.caches[index]
        s = self.settings
        return cache.tokens(tokenizer, captions, s.max_token_length, index == 1, s.weighted_captions)

    def __call__(
        self,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        captions: list[str],
        batch: Mapping[str, Any] | None = None,
    ) -> Conditioning:
        """Conditioning of ``captions`` on the first text encoder's device; ``batch`` must hold ``SIZE_KEYS``."""
        (clip_l, clip_g), (tokenizer_l, tokenizer_g) = text_encoders, tokenizers
        sizes = time_ids(batch, len(captions))
        device = next(clip_l.parameters()).device
        states = []
        pooled = None
        for index, (encoder, tokenizer) in enumerate(((clip_l, tokenizer_l), (clip_g, tokenizer_g))):
            ids, weights = self._tokens(index, tokenizer, captions)
            count, n_chunks = ids.shape[:2]
            flat = ids.reshape(count * n_chunks, MAX_LENGTH).to(device)
            output = encoder(flat, output_hidden_states=True, return_dict=True)
            hidden = output.hidden_states[-2]
            hidden = merge_chunks(hidden.reshape(count, n_chunks, MAX_LENGTH, hidden.shape[-1]))
            if weights is not None:
                merged = merge_chunks(weights.reshape(count, n_chunks, MAX_LENGTH)).to(hidden.device, hidden.dtype)
                hidden = hidden * merged[..., None]
            states.append(hidden)
            if index == 1:
                eos = _first_eos_states(output.last_hidden_state, flat, tokenizer.eos_token_id)
                projection = extract_model_from_parallel(encoder).text_projection
                pooled = projection(eos.to(projection.weight.dtype)).to(eos.dtype)[::n_chunks]
        hidden_states = torch.cat([states[0], states[1].to(states[0].device)], dim=-1)
        added = {"text_embeds": pooled.to(hidden_states.device), "time_ids": sizes.to(hidden_states.device)}
        return Conditioning(hidden_states, {"added_cond_kwargs": added})


@dataclass(frozen=True, repr=False)
class StableDiffusionXL(ModelFamily):
    """SDXL 1.0 base and its fine-tunes (epsilon or v-prediction)."""

    name: str = "sdxl"
    description: str = "SDXL (CLIP ViT-L and OpenCLIP ViT-bigG text encoders)"
    v2: bool = False
    text_encoder_folders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    text_encoder_classes: tuple[type, ...] = (CLIPTextModel, CLIPTextModelWithProjection)
    tokenizer_folders: tuple[str, ...] = ("tokenizer", "tokenizer_2")
    tokenizer_cache_names: tuple[str, ...] = (
        "openai_clip-vit-large-patch14",
        "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
    )
    latents_npz_suffix: str = "_sdxl.npz"
    sgm_lora_names: bool = True
    fp16_vae_overflows: bool = True

    def text_output_extras(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return (("pool2", ("added_cond_kwargs", "text_embeds")),)

    def finish_conditioning(self, conditioning: Conditioning, batch: Mapping[str, Any] | None) -> Conditioning:
        ids = time_ids(batch, len(conditioning.hidden_states)).to(conditioning.hidden_states.device)
        added = dict(conditioning.unet_kwargs["added_cond_kwargs"], time_ids=ids)
        return Conditioning(conditioning.hidden_states, {**conditioning.unet_kwargs, "added_cond_kwargs": added})

    def __repr__(self) -> str:
        return "StableDiffusionXL()"

    def recognise_checkpoint(self, keys: Collection[str]) -> str | None:
        if f"{UNET_PREFIX}input_blocks.0.0.weight" not in keys:
            return None
        has_l = any(k.startswith(CLIP_L_PREFIX) for k in keys)
        has_g = any(k.startswith(CLIP_G_PREFIX) for k in keys)
        return "CLIP ViT-L and OpenCLIP ViT-bigG text encoder keys (SDXL)" if has_l and has_g else None

    def claims_diffusers(self, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """A second text encoder or the UNet's ``text_time`` embedding (pooled text and sizes) is SDXL's."""
        return "text_encoder_2" in configs or configs.get("unet", {}).get("addition_embed_type") == "text_time"

    def infer_configs(self, state_dict: Mapping[str, torch.Tensor], v_parameterization: bool | None) -> dict:
        return infer_sdxl_configs(state_dict)

    def checkpoint_part(
        self, state_dict: Mapping[str, torch.Tensor], part: str, config: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        if part == "unet":
            return unet_from_ldm(state_dict, config)
        if part == "vae":
            return vae_from_ldm(state_dict, config)
        if part == "text_encoder":
            return clip_l_from_sgm(state_dict)
        if part == "text_encoder_2":
            return clip_g_from_sgm(state_dict)
        raise ValueError(f"{self.name} has no part {part!r}")

    def to_checkpoint(self, components: Components) -> dict[str, torch.Tensor]:
        """The SGM layout; a v-prediction model also gets the empty ``v_pred`` marker ComfyUI reads."""
        clip_l, clip_g = components.text_encoders
        out = sgm_state_dict(components.unet, components.vae, clip_l, clip_g)
        if components.v_parameterization:
            out["v_pred"] = torch.tensor([])
        return out

    def packaged_tokenizers(self) -> list[Any]:
        """CLIP's BPE twice: ViT-L's pads with EOS, ViT-bigG's with ``!`` (id 0) as sd-scripts sets it."""
        return [load_packaged_tokenizer(v2=False), load_packaged_tokenizer(v2=True)]

    def tiny_configs(self) -> dict[str, Any]:
        clip_l, clip_g = tiny_sdxl_text_encoder_configs()
        return {
            "unet": tiny_sdxl_unet_config(),
            "vae": tiny_vae_config(scaling_factor=0.13025),
            "text_encoder": clip_l,
            "text_encoder_2": clip_g,
        }

    def noise_scheduler(self, v_parameterization: bool) -> DDPMScheduler:
        """SD's DDPM schedule, which sd-scripts also trains SDXL with."""
        return sd_scheduler(v_parameterization)

    def text_encoding(self, settings: TextEncodingSettings, *, cached: bool = True) -> SDXLTextEncoding:
        return SDXLTextEncoding(settings, (TokenCache(), TokenCache()) if cached else None)

    def latent_scale(self, vae: torch.nn.Module) -> float:
        return float(vae.config.scaling_factor)

    def pipeline(self, components: Components) -> Any:
        from diffusers import StableDiffusionXLPipeline

        clip_l, clip_g = components.text_encoders
        tokenizer_l, tokenizer_g = components.tokenizers
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=clip_l,
            text_encoder_2=clip_g,
            tokenizer=tokenizer_l,
            tokenizer_2=tokenizer_g,
            unet=components.unet,
            scheduler=components.scheduler,
        )

    def base_model_version(self, v_parameterization: bool) -> str:
        """sd-scripts' ``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0``, whatever the prediction type."""
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        """sd-scripts' ``ARCH_SD_XL_V1_BASE`` (the prediction type goes to ``modelspec.prediction_type``)."""
        return "stable-diffusion-xl-v1-base"

    def default_resolution(self, v_parameterization: bool) -> int:
        return 1024


SDXL = StableDiffusionXL()
