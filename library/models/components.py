"""The parts of a Stable Diffusion model that training works with, passed around as one value."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class Components:
    """UNet, VAE, text encoder and tokenizer of one SD 1.x/2.x model, plus what kind of model it is."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    v2: bool = False
    v_parameterization: bool = False
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_parameterization else "epsilon"

    def to_pipeline(self):
        """A diffusers StableDiffusionPipeline sharing these modules (for sampling and saving)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
