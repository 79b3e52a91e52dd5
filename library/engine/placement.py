"""Where the base model's parts live during training, and in which precision; plus the optimizer set-up details
(fp16 unscaling, fused backward, a cheap zero_grad) that depend on that placement."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator

from library.engine.config import EngineConfig
from library.engine.recipe import Recipe
from library.engine.step import StepModels
from library.errors import UserError
from library.models.components import Components
from library.optimizers import register_fused_backward

PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def place_models(
    config: EngineConfig, components: Components, recipe: Recipe, device: torch.device, weight_dtype: torch.dtype
) -> StepModels:
    """Freeze the base model (every text encoder of its family) in the working precision, except the modules a
    recipe trains whole, which keep their weights' every bit; the recipe then attaches what is trained.

    With cached latents the VAE is only needed for samples (which move it over while they run), so it is kept
    off the accelerator."""
    c = components
    vae_dtype = torch.float32 if config.no_half_vae else weight_dtype
    vae_device = torch.device("cpu") if config.latents_cached else device
    placements = [(c.vae, vae_dtype, vae_device), (c.unet, weight_dtype, device)]
    placements += [(encoder, weight_dtype, device) for encoder in c.text_encoders]
    trained_whole = {id(m) for m in recipe.full_precision_modules(c)}
    for module, dtype, place in placements:
        module.requires_grad_(False)
        module.to(place)
        if module.dtype != dtype and id(module) not in trained_whole:
            module.to(dtype=dtype)
    c.vae.eval()
    if vae_device != device and device.type == "cuda":
        torch.cuda.empty_cache()
    recipe.setup(c, device, weight_dtype)
    if config.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if recipe.train_text_encoder:
            for encoder in c.text_encoders:
                encoder.gradient_checkpointing_enable()
    training = config.gradient_checkpointing
    c.unet.train(training)
    for encoder in c.text_encoders:
        encoder.train(training and recipe.train_text_encoder)
    return StepModels(
        unet=c.unet,
        text_encoders=tuple(c.text_encoders),
        tokenizers=tuple(c.tokenizers),
        vae=c.vae,
        vae_scale=c.family.latent_scale(c.vae),
    )


def fuse_backward(config: EngineConfig, accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> list[Any]:
    """--fused_backward_pass: each parameter is stepped by a hook as its gradient arrives (the loop then never
    calls ``optimizer.step()``); refused where gradients are reduced or unscaled after backward. Returns the hook
    handles, to remove after training."""
    if accelerator.num_processes > 1:
        raise UserError(
            f"--fused_backward_pass works in one process only ({accelerator.num_processes} were launched): "
            "launch one process or drop --fused_backward_pass"
        )
    if accelerator.scaler is not None:
        raise UserError(
            "--fused_backward_pass cannot use fp16 loss scaling (--mixed_precision fp16): "
            "use --mixed_precision bf16 or no, or drop --fused_backward_pass"
        )
    return register_fused_backward(optimizer, config.max_grad_norm, config.gradient_accumulation_steps)


def grad_zeroer(optimizer: Any) -> Callable[[], None]:
    """``optimizer.zero_grad(set_to_none=True)`` for the loop, as accelerate's AcceleratedOptimizer does it but
    without the ``inspect.signature`` it calls every step: its check of the wrapped optimizer is made once here."""
    inner = getattr(optimizer, "optimizer", None)
    gradient_state = getattr(optimizer, "gradient_state", None)
    if inner is None or gradient_state is None or "set_to_none" not in inspect.signature(inner.zero_grad).parameters:
        return partial(optimizer.zero_grad, set_to_none=True)

    def zero_grad() -> None:
        if gradient_state.sync_gradients:
            inner.zero_grad(set_to_none=True)

    return zero_grad


def allow_fp16_unscaling(scaler: Any) -> None:
    """--full_fp16 keeps the trained weights in fp16; torch's GradScaler refuses fp16 gradients unless told (as
    sd-scripts' patch_accelerator_for_fp16_training does)."""
    unscale = scaler._unscale_grads_

    def unscale_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16
