"""The recipes' typed settings: frozen values whose field names are flag names, read from the parsed flags with
``library.config.settings.settings_from_flags`` by the entry scripts. Kept apart from the recipes so a script can
name them without importing the model code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from library.config.sdxl_flags import UNET_BLOCKS_FOR_BLOCK_LR
from library.errors import UserError
from library.metadata import MetadataSettings
from library.textual_inversion import OBJECT_TEMPLATES, STYLE_TEMPLATES


@dataclass(frozen=True)
class NetworkSettings:
    """train_network.py's network flags (flag names; build with ``settings_from_flags``).

    ``metadata`` holds the flags recorded in the saved file; ``module_flags`` is a read-only copy of every parsed
    flag, handed to a network module's ``prepare_network(args)`` (sd-scripts' interface: modules read any flag)."""

    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float = 1
    network_dropout: float | None = None
    network_args: list[str] | None = None
    network_weights: str | None = None
    dim_from_weights: bool = False
    base_weights: list[str] | None = None
    base_weights_multiplier: list[float] | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    text_encoder_lr: Any = None
    unet_lr: float | None = None
    learning_rate: float = 2e-06
    scale_weight_norms: float | None = None
    save_precision: str | None = None
    no_metadata: bool = False
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    module_flags: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class FullModelSettings:
    """train_db.py's and fine_tune.py's own flags (flag names; build with ``settings_from_flags``); ``metadata``
    holds the flags recorded in the saved model's ``modelspec.*``."""

    learning_rate: float = 2e-06
    learning_rate_te: float | None = None
    learning_rate_te1: float | None = None
    learning_rate_te2: float | None = None
    block_lr: str | None = None
    train_text_encoder: bool = False
    stop_text_encoder_training: int | None = None
    no_token_padding: bool = False
    use_safetensors: bool = False
    from_scratch_config: str | None = None
    fp8_base: bool = False
    fp8_base_unet: bool = False
    max_token_length: int | None = None
    weighted_captions: bool = False
    clip_skip: int | None = None
    metadata: MetadataSettings = field(default_factory=MetadataSettings)

    def __post_init__(self) -> None:
        for flag in ("fp8_base", "fp8_base_unet"):
            if getattr(self, flag):
                raise UserError(
                    f"--{flag} stores a frozen base model in fp8 (train_network.py); this script trains the UNet's "
                    f"own weights, which stay in full precision: drop --{flag}"
                )
        if self.learning_rate_te is not None and self.learning_rate_te < 0:
            raise UserError(f"--learning_rate_te {self.learning_rate_te}: must be 0 or more")
        parse_block_lr(self.block_lr)

    @property
    def block_lrs(self) -> tuple[float, ...] | None:
        """--block_lr as 23 learning rates (sdxl_train.py), None without it."""
        return parse_block_lr(self.block_lr)


@dataclass(frozen=True)
class TextualInversionSettings:
    """train_textual_inversion.py's own flags (flag names; build with ``settings_from_flags``); ``metadata`` holds
    the flags recorded in the saved embedding's ``modelspec.*``."""

    token_string: str | None = None
    num_vectors_per_token: int = 1
    init_word: str | None = None
    weights: str | None = None
    use_object_template: bool = False
    use_style_template: bool = False
    learning_rate: float = 2e-06
    save_precision: str | None = None
    allow_unsafe_pickle: bool = False
    metadata: MetadataSettings = field(default_factory=MetadataSettings)

    def __post_init__(self) -> None:
        if self.use_object_template and self.use_style_template:
            raise UserError("--use_object_template and --use_style_template exclude each other; pick one")

    @property
    def templates(self) -> tuple[str, ...] | None:
        """sd-scripts' imagenet templates for ``--use_object_template`` / ``--use_style_template`` (None: captions)."""
        if self.use_object_template:
            return OBJECT_TEMPLATES
        if self.use_style_template:
            return STYLE_TEMPLATES
        return None


def parse_block_lr(value: str | None) -> tuple[float, ...] | None:
    """sdxl_train.py's ``--block_lr``: 23 comma-separated learning rates of 0 or more (0 freezes that block)."""
    if value is None:
        return None
    try:
        rates = tuple(float(v) for v in value.split(","))
    except ValueError:
        rates = ()
    if len(rates) != UNET_BLOCKS_FOR_BLOCK_LR or any(not 0 <= r < float("inf") for r in rates):
        raise UserError(
            f"--block_lr {value[:80]}: give {UNET_BLOCKS_FOR_BLOCK_LR} comma-separated learning rates of 0 or more "
            "(0 freezes that block)"
        )
    return rates
