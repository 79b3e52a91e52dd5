"""The model-family seam: what differs between SD 1.x, SD 2.x (and later SDXL, SD3, FLUX) behind one interface.

Loading, saving, the training loop, sampling and metadata ask a ``ModelFamily`` instead of branching on the model
kind. Each family module (``library.models.sd``, ``library.models.sdxl``) implements it; ``families()`` lists
them in detection order, so a new family is one new module and one entry there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from library.errors import UserError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from library.models.components import Components
    from library.text.encode import TextEncodingSettings


def _moved(value: Any, device: torch.device | str | None, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, Mapping):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    return value


def _rows(value: Any, index: Sequence[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[list(index)]
    if isinstance(value, Mapping):
        return {k: _rows(v, index) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on: the text encoders' hidden states plus extra keyword arguments of the
    UNet call (none for SD 1.x/2.x; SDXL adds ``added_cond_kwargs`` with pooled ``text_embeds`` and ``time_ids``)."""

    hidden_states: torch.Tensor
    unet_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str | None, dtype: torch.dtype) -> Conditioning:
        """A copy with every tensor on ``device`` and every floating-point tensor in ``dtype``."""
        return Conditioning(_moved(self.hidden_states, device, dtype), _moved(dict(self.unet_kwargs), device, dtype))

    def rows(self, index: Sequence[int]) -> Conditioning:
        """The conditioning of these batch rows, in this order (every tensor indexed along its first axis)."""
        return Conditioning(_rows(self.hidden_states, index), _rows(dict(self.unet_kwargs), index))

    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for ``noisy_latents`` at ``timesteps`` under this conditioning."""
        return unet(noisy_latents, timesteps, self.hidden_states, **self.unet_kwargs).sample


class TextEncoding(Protocol):
    """Captions to ``Conditioning`` through the given (possibly trained or wrapped) text encoders and tokenizers.

    ``batch`` is the training batch the captions came from: SDXL reads its original sizes, crops and target sizes
    there for the size embeddings (``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw``: one (h, w),
    (top, left), (h, w) pair per caption); SD 1.x/2.x ignore it. Sampling passes ``size_batch(height, width, n)``.
    """

    def __call__(
        self,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        captions: list[str],
        batch: Mapping[str, Any] | None = None,
    ) -> Conditioning: ...


class ModelFamily(ABC):
    """One kind of model: its file layouts and how to recognise them, its text conditioning, latents, sample
    pipeline and the names sd-scripts' metadata gives it.

    LoRA key prefixes are not here: networks get the text encoders through sd-scripts' ``create_network``
    interface (one module, or a list for several) and name them from that (``lora_te``; ``lora_te1``, ``lora_te2``).

    Attributes every family sets:
      ``name``: short id (``sd1``, ``sd2``; SDXL: ``sdxl``).
      ``description``: how messages name it (``SD 1.x (CLIP ViT-L text encoder)``).
      ``v2``: sd-scripts' ``--v2`` and ``ss_v2`` (True only for SD 2.x).
      ``text_encoder_folders`` / ``text_encoder_classes``: diffusers subfolders and transformers classes of the
      text encoders, in order (SD: one; SDXL: ``text_encoder`` and ``text_encoder_2``).
      ``tokenizer_folders`` / ``tokenizer_cache_names``: the tokenizers' diffusers subfolders and their folder
      names under ``--tokenizer_cache_dir``, one per text encoder.
      ``latents_npz_suffix``: the end of sd-scripts' latent cache file names (``_sd.npz``; SDXL ``_sdxl.npz``).
      ``sgm_lora_names``: sd-scripts trains this family's LoRA on Stability's SGM UNet (SDXL), so LoRA keys use SGM
      module names and its modelspec names Stability's implementation.
      ``fp16_vae_overflows``: its stock VAE gives inf/NaN in float16 (SDXL), so fp16 runs want ``--no_half_vae``.
    """

    name: str
    description: str
    v2: bool
    text_encoder_folders: tuple[str, ...]
    text_encoder_classes: tuple[type, ...]
    tokenizer_folders: tuple[str, ...]
    tokenizer_cache_names: tuple[str, ...]
    latents_npz_suffix: str
    sgm_lora_names: bool
    fp16_vae_overflows: bool

    def text_output_extras(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Caption-only tensors in ``Conditioning.unet_kwargs`` that --cache_text_encoder_outputs keeps, as
        (sd-scripts' array name, key path); SD has none, SDXL its pooled output (``pool2``)."""
        return ()

    def finish_conditioning(self, conditioning: Conditioning, batch: Mapping[str, Any] | None) -> Conditioning:
        """Add what depends on the batch rather than the captions to cached text outputs (SDXL: ``time_ids``)."""
        return conditioning

    @abstractmethod
    def recognise_checkpoint(self, keys: Collection[str]) -> str | None:
        """What in these single-file state-dict keys shows this family (for the load notes), or None."""

    @abstractmethod
    def claims_diffusers(self, configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether a diffusers model with these ``config.json`` contents (by subfolder name) is of this family."""

    @abstractmethod
    def infer_configs(self, state_dict: Mapping[str, torch.Tensor], v_parameterization: bool | None) -> dict:
        """Diffusers configs by subfolder name (``unet``, ``vae``, text encoders) matching a single file's shapes."""

    @abstractmethod
    def checkpoint_part(
        self, state_dict: Mapping[str, torch.Tensor], part: str, config: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The diffusers/transformers state dict of one part (a subfolder name) of a single-file state dict."""

    @abstractmethod
    def to_checkpoint(self, components: Components) -> dict[str, torch.Tensor]:
        """The whole model as one single-file state dict in the layout other tools read (SD: LDM keys)."""

    @abstractmethod
    def packaged_tokenizers(self) -> list[Any]:
        """The tokenizers shipped with the project, one per text encoder (nothing is downloaded)."""

    @abstractmethod
    def tiny_configs(self) -> dict[str, Any]:
        """Configs of a tiny random model of this family by subfolder name (text encoders as config objects)."""

    @abstractmethod
    def noise_scheduler(self, v_parameterization: bool) -> DDPMScheduler:
        """The training noise schedule of this family."""

    @abstractmethod
    def text_encoding(self, settings: TextEncodingSettings, *, cached: bool = True) -> TextEncoding:
        """Captions to conditioning with sd-scripts' ``--max_token_length``, ``--clip_skip`` and
        ``--weighted_captions``; ``cached`` keeps each caption's token ids (captions repeat every epoch)."""

    @abstractmethod
    def latent_scale(self, vae: torch.nn.Module) -> float:
        """The factor VAE latents are multiplied by before the denoiser sees them (SD 1.x/2.x: 0.18215)."""

    @abstractmethod
    def pipeline(self, components: Components) -> Any:
        """A diffusers pipeline sharing the model's modules (for saving diffusers folders and outside sampling)."""

    @abstractmethod
    def base_model_version(self, v_parameterization: bool) -> str:
        """sd-scripts' ``ss_base_model_version`` (``sd_v1``, ``sd_v2_v``; SDXL: ``sdxl_base_v1-0``)."""

    @abstractmethod
    def modelspec_architecture(self, v_parameterization: bool) -> str:
        """``modelspec.architecture`` before any ``/lora`` suffix (``stable-diffusion-v2-768-v``)."""

    @abstractmethod
    def default_resolution(self, v_parameterization: bool) -> int:
        """The side in pixels the base model was trained at (``modelspec.resolution`` when none is given)."""


def families() -> tuple[ModelFamily, ...]:
    """Every family, in the order detection tries them (a file or folder goes to the first that claims it)."""
    from library.models.sd import SD1, SD2
    from library.models.sdxl import SDXL

    return (SDXL, SD2, SD1)


def size_batch(height: int, width: int, count: int) -> dict[str, list[tuple[int, int]]]:
    """The size entries of a batch of ``count`` images generated at ``height`` x ``width`` (original and target
    size the image size, crop (0, 0)), for encoding sample prompts of any family (SD 1.x/2.x ignore them)."""
    return {
        "original_sizes_hw": [(height, width)] * count,
        "crop_top_lefts": [(0, 0)] * count,
        "target_sizes_hw": [(height, width)] * count,
    }


def family_named(name: str) -> ModelFamily:
    """The family called ``name``; a UserError lists the known names otherwise."""
    for family in families():
        if family.name == name:
            return family
    known = ", ".join(f.name for f in families())
    raise UserError(f"unknown model family {name!r}; use one of {known}")


def checkpoint_family(keys: Collection[str]) -> tuple[ModelFamily, str] | None:
    """The family of a single-file state dict with these keys and what showed it, or None when none claims it."""
    for family in families():
        evidence = family.recognise_checkpoint(keys)
        if evidence is not None:
            return family, evidence
    return None


def diffusers_family(configs: Mapping[str, Mapping[str, Any]]) -> ModelFamily | None:
    """The family of a diffusers model with these ``config.json`` contents (by subfolder name), or None."""
    return next((family for family in families() if family.claims_diffusers(configs)), None)
