"""The parts of a model that training works with, passed around as one value, with the family they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

if TYPE_CHECKING:
    from library.models.family import ModelFamily


@dataclass
class Components:
    """UNet, VAE, text encoders and tokenizers of one model, its noise scheduler, and its family.

    ``text_encoders``/``tokenizers`` hold one entry per text encoder of the family, in its order (SD 1.x/2.x: one;
    SDXL: two). ``text_encoder``/``tokenizer`` give the only one and raise for a family with several, so code that
    knows a single encoder keeps working for SD 1.x/2.x and cannot silently skip SDXL's second one.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: DDPMScheduler
    family: ModelFamily
    v_parameterization: bool = False
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def _only(self, items: list[Any], what: str) -> Any:
        if len(items) != 1:
            raise ValueError(f"this {self.family.name} model has {len(items)} {what}s; use Components.{what}s")
        return items[0]

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder of a one-encoder family (SD 1.x/2.x)."""
        return self._only(self.text_encoders, "text_encoder")

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of a one-encoder family (SD 1.x/2.x)."""
        return self._only(self.tokenizers, "tokenizer")

    @property
    def prediction_type(self) -> str:
        """The scheduler's name for what the model predicts: ``v_prediction`` or ``epsilon``."""
        return "v_prediction" if self.v_parameterization else "epsilon"

    def to_pipeline(self) -> Any:
        """The family's diffusers pipeline sharing these modules (for sampling and saving)."""
        return self.family.pipeline(self)
