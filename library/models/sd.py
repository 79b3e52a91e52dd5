"""The Stable Diffusion 1.x and 2.x families: one CLIP text encoder, LDM single files, 0.18215 latents."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import CLIPTextModel

from library.models.convert import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_state_dict,
    text_from_ldm,
    unet_from_ldm,
    vae_from_ldm,
)
from library.models.detect import infer_text_config, infer_unet_config, infer_vae_config
from library.models.family import Conditioning, ModelFamily
from library.models.tiny import sd_scheduler, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config
from library.text.encode import TextEncodingSettings, TokenCache, encode_prompts
from library.text.tokenizer import load_packaged_tokenizer

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from library.models.components import Components


@dataclass(frozen=True)
class SDTextEncoding:
    """Captions to the one text encoder's states, as ``library.text.encode.encode_prompts`` makes them."""

    v2: bool
    settings: TextEncodingSettings
    cache: TokenCache | None = None

    def __call__(
        self,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        captions: list[str],
        batch: Mapping[str, Any] | None = None,
    ) -> Conditioning:
        """Conditioning of ``captions`` on the text encoder's device; ``batch`` is not needed by SD 1.x/2.x."""
        (text_encoder,), (tokenizer,) = text_encoders, tokenizers
        states = encode_prompts(
            text_encoder,
            tokenizer,
            captions,
            max_token_length=self.settings.max_token_length,
            clip_skip=self.settings.clip_skip,
            weighted=self.settings.weighted_captions,
            v2=self.v2,
            cache=self.cache,
        )
        return Conditioning(states)


@dataclass(frozen=True, repr=False)
class StableDiffusion(ModelFamily):
    """SD 1.x (CLIP ViT-L, quick GELU) or SD 2.x (OpenCLIP ViT-H, GELU, penultimate layer); the two differ in
    their text encoder and its single-file keys only."""

    name: str
    description: str
    v2: bool
    text_prefix: str
    checkpoint_evidence: str
    tokenizer_cache_names: tuple[str, ...]

    text_encoder_folders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    text_encoder_classes: ClassVar[tuple[type, ...]] = (CLIPTextModel,)
    tokenizer_folders: ClassVar[tuple[str, ...]] = ("tokenizer",)
    latents_npz_suffix: ClassVar[str] = "_sd.npz"
    sgm_lora_names: ClassVar[bool] = False
    fp16_vae_overflows: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"StableDiffusion({self.name!r})"

    def recognise_checkpoint(self, keys: Collection[str]) -> str | None:
        if f"{UNET_PREFIX}input_blocks.0.0.weight" not in keys:
            return None
        return self.checkpoint_evidence if any(k.startswith(self.text_prefix) for k in keys) else None

    def claims_diffusers(self, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """OpenCLIP (SD 2.x) uses GELU where CLIP ViT-L (SD 1.x) uses quick GELU; a second text encoder or a
        ``text_time`` UNet embedding is SDXL's, never SD's."""
        if "text_encoder_2" in configs or configs.get("unet", {}).get("addition_embed_type") is not None:
            return False
        return (configs.get("text_encoder", {}).get("hidden_act", "quick_gelu") == "gelu") == self.v2

    def infer_configs(self, state_dict: Mapping[str, torch.Tensor], v_parameterization: bool | None) -> dict:
        return {
            "unet": infer_unet_config(state_dict, self.v2, v_parameterization),
            "vae": infer_vae_config(state_dict, VAE_PREFIX),
            "text_encoder": infer_text_config(state_dict, self.v2),
        }

    def checkpoint_part(
        self, state_dict: Mapping[str, torch.Tensor], part: str, config: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        if part == "unet":
            return unet_from_ldm(state_dict, config)
        if part == "vae":
            return vae_from_ldm(state_dict, config)
        if part == "text_encoder":
            return text_from_ldm(state_dict, self.v2)
        raise ValueError(f"{self.name} has no part {part!r}")

    def to_checkpoint(self, components: Components) -> dict[str, torch.Tensor]:
        return ldm_state_dict(components.unet, components.vae, components.text_encoder, self.v2)

    def packaged_tokenizers(self) -> list[Any]:
        return [load_packaged_tokenizer(v2=self.v2)]

    def tiny_configs(self) -> dict[str, Any]:
        return {
            "unet": tiny_unet_config(self.v2),
            "vae": tiny_vae_config(),
            "text_encoder": tiny_text_encoder_config(self.v2),
        }

    def noise_scheduler(self, v_parameterization: bool) -> DDPMScheduler:
        return sd_scheduler(v_parameterization)

    def text_encoding(self, settings: TextEncodingSettings, *, cached: bool = True) -> SDTextEncoding:
        return SDTextEncoding(self.v2, settings, TokenCache() if cached else None)

    def latent_scale(self, vae: torch.nn.Module) -> float:
        return float(vae.config.scaling_factor)

    def pipeline(self, components: Components) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=components.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def base_model_version(self, v_parameterization: bool) -> str:
        """As sd-scripts' ``model_util.get_model_version_str_for_sd1_sd2``."""
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if v_parameterization else "")

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        """As sd-scripts' ``sai_model_spec``: SD 1.x has one name, SD 2.x one per prediction type."""
        if not self.v2:
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"

    def default_resolution(self, v_parameterization: bool) -> int:
        return 768 if self.v2 and v_parameterization else 512


SD1 = StableDiffusion(
    name="sd1",
    description="SD 1.x (CLIP ViT-L text encoder)",
    v2=False,
    text_prefix=SD1_TEXT_PREFIX,
    checkpoint_evidence="CLIP ViT-L text encoder keys (SD 1.x)",
    tokenizer_cache_names=("openai_clip-vit-large-patch14",),
)
SD2 = StableDiffusion(
    name="sd2",
    description="SD 2.x (OpenCLIP text encoder)",
    v2=True,
    text_prefix=SD2_TEXT_PREFIX,
    checkpoint_evidence="OpenCLIP text encoder keys (SD 2.x)",
    tokenizer_cache_names=("stabilityai_stable-diffusion-2",),
)
