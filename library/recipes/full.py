"""Full-weight training (``train_db.py``, ``fine_tune.py``): the UNet and optionally the text encoder are trained
and whole models are saved in sd-scripts' formats (ckpt, safetensors, diffusers, diffusers_safetensors).

This module holds the recipe, its settings and the end of the run both scripts share (text encoding, loop).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.engine.config import EngineConfig
from library.engine.launch import PreparedRun
from library.engine.loop import TrainResult
from library.engine.recipe import ParamGroups, Recipe
from library.errors import UserError
from library.models.components import Components
from library.models.family import Conditioning, TextEncoding
from library.models.save import SAVE_FORMATS, save_model
from library.modelspec import modelspec_from_settings
from library.recipes.settings import FullModelSettings
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


def unpadded_text_encoding(settings: FullModelSettings) -> TextEncoding:
    """--no_token_padding: captions are padded to the batch's longest (Diffusers' DreamBooth), not to 77 tokens;
    for a model with one text encoder (SD 1.x/2.x, where unchunked ids are encoded alike)."""
    if settings.max_token_length is not None or settings.weighted_captions:
        raise UserError(
            "--no_token_padding works with plain captions of up to 75 tokens; drop --max_token_length "
            "and --weighted_captions, or drop --no_token_padding"
        )

    def encode(
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[Any],
        captions: list[str],
        batch: Mapping[str, Any] | None = None,
    ) -> Conditioning:
        if len(text_encoders) != 1:
            raise UserError(f"--no_token_padding works with one text encoder, this model has {len(text_encoders)}")
        (text_encoder,), (tokenizer,) = text_encoders, tokenizers
        device = next(text_encoder.parameters()).device
        ids = tokenizer(captions, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt").input_ids
        return Conditioning(encode_token_ids(text_encoder, ids.to(device), clip_skip=settings.clip_skip))

    return encode


class FullRecipe(Recipe):
    """Train every UNet weight and, for the first ``text_encoder_steps`` steps (None: all, 0: never), the text
    encoder's; save the whole model with ``library.models.save.save_model``.

    Steps are the loop's global steps (:meth:`on_step_start`), so resumed runs and steps skipped under
    ``--nan_policy skip`` count as the loop counts them."""

    def __init__(self, settings: FullModelSettings, config: EngineConfig, *, text_encoder_steps: int | None):
        if text_encoder_steps is not None and text_encoder_steps < 0:
            raise ValueError("text_encoder_steps must be None or 0 or more")
        self.settings = settings
        self.config = config
        self.text_encoder_steps = text_encoder_steps
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

    def trained_text_encoders(self, components: Components | None = None) -> list[tuple[nn.Module, float | None]]:
        """The text encoders this run trains (of ``components``, else the set-up model's), each with its learning
        rate (None: the shared one).

        One encoder (SD 1.x/2.x): --learning_rate_te, else in the UNet's group. Several (SDXL, sdxl_train.py):
        encoder i at --learning_rate_te<i>, else --learning_rate; one whose rate is 0 stays frozen."""
        if not self.text_encoder_trained:
            return []
        c, s = components or self.components, self.settings
        if len(c.text_encoders) == 1:
            return [(c.text_encoders[0], s.learning_rate_te)]
        rates = (s.learning_rate_te1, s.learning_rate_te2)
        chosen = [(e, s.learning_rate if r is None else r) for e, r in zip(c.text_encoders, rates, strict=True)]
        return [(encoder, rate) for encoder, rate in chosen if rate != 0]

    def full_precision_modules(self, components: Components) -> list[nn.Module]:
        return [components.unet, *(encoder for encoder, _ in self.trained_text_encoders(components))]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.components.unet, *(encoder for encoder, _ in self.trained_text_encoders())]

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        encoders = [p for encoder, _ in self.trained_text_encoders() for p in encoder.parameters()]
        return {"unet": list(self.components.unet.parameters()), "text_encoder": encoders}

    def param_groups(self) -> ParamGroups:
        """One group as sd-scripts builds it, or UNet and text encoder apart when --learning_rate_te is given;
        for SDXL a group per text encoder (``textencoder1``/``2``) and with --block_lr a group per UNet block."""
        c, s = self.components, self.settings
        if s.block_lrs is not None:
            from library.models.sdxl_blocks import block_param_groups

            groups, names = block_param_groups(c.unet, s.block_lrs)
        else:
            groups, names = [{"params": list(c.unet.parameters())}], ["unet"]
        encoders = self.trained_text_encoders()
        if len(c.text_encoders) == 1:
            if encoders and encoders[0][1] is None:
                groups[0]["params"] = groups[0]["params"] + list(encoders[0][0].parameters())
            elif encoders:
                groups = [{**g, "lr": g.get("lr", s.learning_rate)} for g in groups]
                groups.append({"params": list(encoders[0][0].parameters()), "lr": encoders[0][1]})
                names.append("textencoder")
            return ParamGroups(groups, names)
        groups = [{**g, "lr": g.get("lr", s.learning_rate)} for g in groups]
        for encoder, rate in encoders:
            index = c.text_encoders.index(encoder) + 1
            groups.append({"params": list(encoder.parameters()), "lr": rate})
            names.append(f"textencoder{index}")
        return ParamGroups(groups, names)

    def fingerprint(self) -> dict[str, Any]:
        trains = "unet + text encoder" if self.text_encoder_trained else "unet"
        return {"trains": trains, **super().fingerprint()}

    def on_epoch_start(self, epoch: int) -> None:
        c, checkpointing = self.components, self.config.gradient_checkpointing
        c.unet.train()
        for encoder in c.text_encoders:
            encoder.train(checkpointing or self.train_text_encoder)

    def on_step_start(self, global_step: int) -> None:
        """From global step ``text_encoder_steps`` on (0-based: after that many steps, skipped ones included) the
        text encoder stops receiving gradients."""
        was_training = self.train_text_encoder
        self.step = global_step
        if was_training and not self.train_text_encoder:
            logger.info(f"stop text encoder training at step {global_step} (--stop_text_encoder_training)")
            if not self.config.gradient_checkpointing:
                for encoder in self.components.text_encoders:
                    encoder.train(False)

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        c = self.components
        modelspec = modelspec_from_settings(self.settings.metadata, c.family, c.v_parameterization, lora=False)
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
    run: PreparedRun | None, settings: FullModelSettings, *, text_encoder_steps: int | None, tracker_name: str
) -> TrainResult | None:
    """The end every full-weight script shares: sd-scripts' saved-format rule (now that the base model's kind of
    source is known), --no_token_padding's text encoding, and the loop with a :class:`FullRecipe`. ``run`` is None
    after --debug_dataset, which trains nothing."""
    if run is None:
        return None
    save_as = resolve_save_format(run.config.save_model_as, settings.use_safetensors, run.components.source)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, save_model_as=save_as))
    parts = run.parts
    if settings.no_token_padding:
        parts = dataclasses.replace(parts, encode_text=unpadded_text_encoding(settings))
    recipe = FullRecipe(settings, run.config, text_encoder_steps=text_encoder_steps)
    return run.train(recipe, parts=parts, tracker_name=tracker_name)
