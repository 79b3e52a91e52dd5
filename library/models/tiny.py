"""Tiny models of each family (SD 1.x / 2.x / XL architecture) with random weights, for tests and the demo.

They keep each family's layout (SD: 4 UNet blocks of 2 layers; SDXL: 3 blocks, the first without attention, deeper
transformers lower down and the ``text_time`` embedding; a VAE that downsamples 8x; CLIP text encoders with the
real 49408-token tokenizer) at a few million parameters, mostly token embeddings, so a step runs in well under a
second.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

from library.models.components import Components
from library.models.family import ModelFamily, families, family_named

TEXT_WIDTH = 32
SDXL_POOLED_WIDTH = 16
SDXL_TIME_WIDTH = 8


def tiny_unet_config(v2: bool = False) -> dict:
    """UNet2DConditionModel kwargs of the tiny SD1 (or SD2: linear projections, per-block heads) UNet."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(2, 4, 4, 4) if v2 else 4,
        use_linear_projection=v2,
    )


def tiny_vae_config(scaling_factor: float = 0.18215) -> dict:
    """AutoencoderKL kwargs of the tiny VAE (4 levels, so it downsamples 8x like SD's; SDXL: 0.13025 scale)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_sdxl_unet_config() -> dict:
    """UNet2DConditionModel kwargs of the tiny SDXL UNet: SDXL's block types, linear projections, per-block
    transformer depth and ``text_time`` embedding (pooled G projection + 6 size numbers of 8 sinusoids each)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        norm_num_groups=16,
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(1, 2, 2),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_WIDTH,
        projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + 6 * SDXL_TIME_WIDTH,
    )


def tiny_sdxl_text_encoder_configs() -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """The tiny CLIP ViT-L-like (quick GELU) and OpenCLIP ViT-bigG-like (GELU, projection) encoders' configs."""
    clip_l = tiny_text_encoder_config(False)
    clip_l.num_attention_heads, clip_l.num_hidden_layers = 2, 3
    clip_g = tiny_text_encoder_config(True)
    clip_g.num_attention_heads, clip_g.projection_dim = 2, SDXL_POOLED_WIDTH
    return clip_l, clip_g


def tiny_text_encoder_config(v2: bool = False) -> CLIPTextConfig:
    """The tiny CLIP text encoder's config (SD2: GELU and ``!`` padding, as OpenCLIP)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if v2 else 49407,
    )


def sd_scheduler(v_parameterization: bool = False) -> DDPMScheduler:
    """The noise schedule every SD 1.x/2.x model was trained with."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def _perturb_norms(model: torch.nn.Module) -> None:
    """Give normalisation layers non-trivial scales and shifts, as trained models have.

    Freshly initialised norms (weight 1, bias 0) make every token's features average exactly 0, which turns
    ratio-of-means computations such as weighted-caption rescaling into 0/0.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)


def tiny_presets() -> tuple[str, ...]:
    """The names of the built-in tiny models, ``tiny-<family name>`` for every family."""
    return tuple(sorted(f"tiny-{family.name}" for family in families()))


def tiny_model(family: ModelFamily, v_parameterization: bool | None = None, seed: int = 0) -> Components:
    """A tiny model of ``family`` with reproducible random weights (v-prediction by default for SD 2.x only)."""
    if v_parameterization is None:
        v_parameterization = family.v2
    configs = family.tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoders = [cls(configs[f]) for f, cls in zip(family.text_encoder_folders, family.text_encoder_classes)]
        for model in (unet, vae, *text_encoders):
            _perturb_norms(model)
            model.eval()
    return Components(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=family.packaged_tokenizers(),
        scheduler=family.noise_scheduler(v_parameterization),
        family=family,
        v_parameterization=v_parameterization,
        source=f"tiny-{family.name}",
    )


def make_tiny_model(v2: bool = False, v_parameterization: bool | None = None, seed: int = 0) -> Components:
    """Build a tiny SD1 (or SD2, v-prediction by default) model with reproducible random weights."""
    return tiny_model(family_named("sd2" if v2 else "sd1"), v_parameterization, seed)
