"""Full-weight training (``train_db.py``, ``fine_tune.py``): the UNet and optionally the text encoder are trained
and whole models are saved in sd-scripts' formats (ckpt, safetensors, diffusers, diffusers_safetensors).

This module holds the recipe and the short launch sequence both scripts share (seed, model, dataset, loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.engine.config import EngineConfig
from library.engine.loop import TrainResult, train
from library.engine.recipe import ParamGroups, Recipe
from library.errors import UserError
from library.metadata import modelspec_from_args
from library.models.components import Components
from library.models.save import SAVE_FORMATS, save_model
from library.text.encode import MAX_LENGTH, encode_token_ids

logger = logging.getLogger("sdtrain")


def resolve_save_format(save_model_as: str | None, use_safetensors: bool, source: str) -> str:
    """sd-scripts' rule: without --save_model_as, save in the base model's kind of format (file or diffusers)."""
    if save_model_as is not None:
        if save_model_as not in SAVE_FORMATS:
            raise UserError(
                f"--save_model_as {save_model_as}: not a model format; use one of {', '.join(SAVE_FORMATS)}"
            )
        return save_model_as
    if Path(source).is_file():
        return "safetensors" if use_safetensors else "ckpt"
    return "diffusers_safetensors" if use_safetensors else "diffusers"


def text_encoder_steps_for_db(stop_text_encoder_training: int | None) -> int | None:
    """train_db's --stop_text_encoder_training: None trains it throughout, a negative value never, N for N steps."""
    if stop_text_encoder_training is None:
        return None
    return max(stop_text_encoder_training, 0)


def unpadded_text_encoding(args: argparse.Namespace, v2: bool) -> Callable[[nn.Module, Any, list[str]], torch.Tensor]:
    """--no_token_padding: captions are padded to the batch's longest (Diffusers' DreamBooth), not to 77 tokens."""
    if args.max_token_length is not None or args.weighted_captions:
        raise UserError(
            "--no_token_padding works with plain captions of up to 75 tokens; drop --max_token_length "
            "and --weighted_captions, or drop --no_token_padding"
        )

    def encode(text_encoder: nn.Module, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        device = next(text_encoder.parameters()).device
        ids = tokenizer(captions, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt").input_ids
        return encode_token_ids(text_encoder, ids.to(device), clip_skip=args.clip_skip, v2=v2)

    return encode


class FullRecipe(Recipe):
    """Train every UNet weight and, for the first ``text_encoder_steps`` steps (None: all, 0: never), the text
    encoder's; save the whole model with ``library.models.save.save_model``.

    Steps are the loop's global steps (:meth:`on_step_start`), so resumed runs and steps skipped under
    ``--nan_policy skip`` count as the loop counts them."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: EngineConfig,
        *,
        text_encoder_steps: int | None,
        learning_rate_te: float | None = None,
    ):
        if text_encoder_steps is not None and text_encoder_steps < 0:
            raise ValueError("text_encoder_steps must be None or 0 or more")
        self.args = args
        self.config = config
        self.text_encoder_steps = text_encoder_steps
        self.learning_rate_te = learning_rate_te
        self.components: Components | None = None
        self.step = 0

    @property
    def text_encoder_trained(self) -> bool:
        """Whether the text encoder is trained at all in this run (it is then in the optimizer and the states)."""
        return self.text_encoder_steps != 0

    @property
    def train_unet(self) -> bool:
        return True

    @property
    def train_text_encoder(self) -> bool:
        limit = self.text_encoder_steps
        return self.text_encoder_trained and (limit is None or self.step < limit)

    def setup(self, components: Components, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Trained weights stay float32 under mixed precision (--full_fp16/--full_bf16 cast them later)."""
        self.components = components
        for module in self.trainable_modules():
            module.to(dtype=torch.float32)
            module.requires_grad_(True)

    def trainable_modules(self) -> list[nn.Module]:
        c = self.components
        return [c.unet, c.text_encoder] if self.text_encoder_trained else [c.unet]

    def param_groups(self) -> ParamGroups:
        """One group as sd-scripts builds it, or UNet and text encoder apart when --learning_rate_te is given."""
        c = self.components
        unet = list(c.unet.parameters())
        if not self.text_encoder_trained:
            return ParamGroups([{"params": unet}], ["unet"])
        text = list(c.text_encoder.parameters())
        if self.learning_rate_te is None:
            return ParamGroups([{"params": unet + text}], ["unet"])
        return ParamGroups(
            [{"params": unet, "lr": self.args.learning_rate}, {"params": text, "lr": self.learning_rate_te}],
            ["unet", "textencoder"],
        )

    def fingerprint(self) -> dict[str, Any]:
        trains = "unet + text encoder" if self.text_encoder_trained else "unet"
        return {"trains": trains, **super().fingerprint()}

    def on_epoch_start(self, epoch: int) -> None:
        c, checkpointing = self.components, self.config.gradient_checkpointing
        c.unet.train()
        c.text_encoder.train(checkpointing or self.train_text_encoder)

    def on_step_start(self, global_step: int) -> None:
        """From global step ``text_encoder_steps`` on (0-based: after that many steps, skipped ones included) the
        text encoder stops receiving gradients."""
        was_training = self.train_text_encoder
        self.step = global_step
        if was_training and not self.train_text_encoder:
            logger.info(f"stop text encoder training at step {global_step} (--stop_text_encoder_training)")
            if not self.config.gradient_checkpointing:
                self.components.text_encoder.train(False)

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        c = self.components
        described = argparse.Namespace(**{**vars(self.args), "v2": c.v2, "v_parameterization": c.v_parameterization})
        modelspec = modelspec_from_args(described, lora=False)
        save_model(
            c,
            path,
            self.config.save_model_as,
            self.config.save_precision,
            metadata=modelspec,
            epoch=epoch,
            global_step=step,
        )
        logger.info(f"saved {path}")


def train_full_model(
    args: argparse.Namespace,
    load: Callable[[int], Components],
    *,
    styles: set[str],
    text_encoder_steps: int | None,
    tracker_name: str,
) -> TrainResult:
    """Seed → ``load(seed)`` → dataset of ``styles`` → the shared loop with a :class:`FullRecipe`."""
    from library.dataset.loader import skipped_summary
    from library.engine.launch import prepare_training_data
    from library.engine.wiring import choose_seed, parts_from_args

    for flag in ("fp8_base", "fp8_base_unet"):
        if getattr(args, flag, False):
            raise UserError(
                f"--{flag} stores a frozen base model in fp8 (train_network.py); this script trains the UNet's own "
                f"weights, which stay in full precision: drop --{flag}"
            )
    if args.learning_rate_te is not None and args.learning_rate_te < 0:
        raise UserError(f"--learning_rate_te {args.learning_rate_te}: must be 0 or more")
    seed = choose_seed(args)
    config = dataclasses.replace(EngineConfig.from_args(args), seed=seed)
    components = load(seed)
    save_as = resolve_save_format(args.save_model_as, bool(args.use_safetensors), components.source)
    config = dataclasses.replace(config, save_model_as=save_as)
    dataset = prepare_training_data(args, styles, components, seed)
    if dataset is None:
        return None
    parts = parts_from_args(args, components)
    if getattr(args, "no_token_padding", False):
        parts = dataclasses.replace(parts, encode_text=unpadded_text_encoding(args, components.v2))
    recipe = FullRecipe(args, config, text_encoder_steps=text_encoder_steps, learning_rate_te=args.learning_rate_te)
    result = train(config, components, dataset, recipe, parts, tracker_name=tracker_name, summary=dataset.summary())
    if dataset.skipped:
        logger.warning(skipped_summary(dataset.skipped))
    return result
