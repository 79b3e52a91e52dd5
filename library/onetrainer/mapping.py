"""OneTrainer setting -> our flag or dataset TOML key, or the reason it has no equivalent here.

``UNSUPPORTED`` is the table of settings we cannot map (listed in the report when they differ from OneTrainer's
default); ``NO_EFFECT`` names the settings that change nothing about the trained result (devices, cache folders,
UI and cloud options) and are skipped silently; the rest is translated by :func:`convert`. Every key the file
sets to a non-default value ends up mapped, approximated (with the difference) or listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError
from library.onetrainer.config import TRAIN_DEFAULTS, OneTrainerConfig

NOT_YET = "not supported yet"

UNSUPPORTED: dict[str, str] = {
    "multi_gpu": "use `accelerate launch` with several processes (docs/multi_gpu.md)",
    "debug_mode": "no debug image dumps; --debug_dataset shows the batches",
    "only_cache": "cache with tools/cache_latents.py instead",
    "force_circular_padding": "not supported (no circular-padding convolutions)",
    "custom_conditioning_image": "not supported (no conditioning-image input to the UNet)",
    "masked_prior_preservation_weight": "not supported (no prior preservation outside the mask)",
    "generalized_offset_noise": "not supported: --noise_offset is sd-scripts' plain offset noise",
    "timestep_shift": "not supported (timestep shifting is for flow-matching models)",
    "dynamic_timestep_shifting": "not supported (timestep shifting is for flow-matching models)",
    "loss_scaler": "not supported: scale the loss or --learning_rate yourself",
    "learning_rate_scaler": "not supported: scale --learning_rate yourself",
    "custom_learning_rate_scheduler": "custom scheduler classes: use --lr_scheduler_type module.Class",
    "scheduler_params": "custom scheduler arguments: use --lr_scheduler_args",
    "preserve_embedding_norm": "not supported",
    "embedding.is_output_embedding": "not supported (no output embeddings)",
    "additional_embeddings": "not supported (train each embedding with train_textual_inversion.py)",
    "lora_weight_dtype": "not supported: LoRA weights stay float32 (bf16/fp16 with --full_bf16/--full_fp16)",
    "lora_decompose_output_axis": "not supported by networks.lora's DoRA",
    "layer_filter": "custom layer filters are not supported by networks.lora (see --network_args preset=)",
    "layer_filter_regex": "custom layer filters are not supported by networks.lora",
    "save_skip_first": "not supported",
    "sample_skip_first": "not supported (--sample_at_first samples before training)",
    "save_filename_prefix": "not supported: intermediate files are named after --output_name",
    "text_encoder_2_sequence_length": "not supported: use --max_token_length 150 or 225 for longer captions",
    "unet.model_name": "separate UNet files are not supported: give a whole model",
    "text_encoder.model_name": "separate text encoder files are not supported: give a whole model",
    "text_encoder_2.model_name": "separate text encoder files are not supported: give a whole model",
    "oft_block_size": "OFT_2 is not supported",
    "oft_block_share": "OFT_2 is not supported",
    "oft_scaled": "OFT_2 is not supported",
    "lokr_dim": "not supported: networks.lokr uses --network_dim",
    "lokr_weight_decompose": "not supported: use lora_decompose (dora_wd)",
    "lokr_dora_on_output": "not supported",
    "lokr_vec_trick": "not supported (a speed option of OneTrainer's LoKr)",
}

# Keys that change nothing about the result here (machine, folders, UI, cloud): skipped without a report line.
NO_EFFECT_PREFIXES = (
    "__version",
    "train_device",
    "temp_device",
    "cache_dir",
    "huggingface_cache_dir",
    "offline_mode",
    "debug_dir",
    "tensorboard_port",
    "tensorboard_expose",
    "tensorboard_always_on",
    "include_train_config",
    "device_indexes",
    "gradient_reduce_precision",
    "fused_gradient_reduce",
    "async_gradient_reduce",
    "async_offloading",
    "enable_autocast_cache",
    "clear_cache_before_training",
    "concept_file_name",
    "sample_definition_file_name",
    "sample_image_format",
    "sample_video_format",
    "sample_audio_format",
    "samples_to_tensorboard",
    "prevent_overwrites",
    "optimizer_defaults",
    "secrets.",
    "cloud.",
    "frames",
    "vb_loss_strength",
    "fallback_train_dtype",
    "embedding.uuid",
    "embedding_weight_dtype",
    "bundle_additional_embeddings",
    "lora_decompose_norm_epsilon",
    "quantization.",
    "prior.",
    "transformer.",
    "unconditional_transformer.",
    "text_encoder_3",
    "text_encoder_4",
    "text_encoder_sequence_length",
    "effnet_encoder.",
    "decoder",
    "vae.",
)

# Per-part keys that change nothing here (frozen text encoders are held in the mixed precision).
NO_EFFECT_SUFFIXES = (
    ".include",
    ".attention_mask",
    ".guidance_scale",
    ".train_embedding",
    ".gradient_checkpointing",
    "text_encoder.weight_dtype",
    "text_encoder_2.weight_dtype",
    "optimizer.stochastic_rounding",
)

SD1 = {"STABLE_DIFFUSION_15", "STABLE_DIFFUSION_15_INPAINTING"}
SD2_V = {"STABLE_DIFFUSION_20", "STABLE_DIFFUSION_21", "STABLE_DIFFUSION_20_INPAINTING", "STABLE_DIFFUSION_20_DEPTH"}
SD2_EPS = {"STABLE_DIFFUSION_20_BASE", "STABLE_DIFFUSION_21_BASE"}
SDXL = {"STABLE_DIFFUSION_XL_10_BASE", "STABLE_DIFFUSION_XL_10_BASE_INPAINTING"}
CONDITIONED = {
    "STABLE_DIFFUSION_15_INPAINTING": "inpainting",
    "STABLE_DIFFUSION_20_INPAINTING": "inpainting",
    "STABLE_DIFFUSION_20_DEPTH": "depth-conditioned",
    "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "inpainting",
}

SCRIPTS = {
    ("sd", "LORA"): "train_network.py",
    ("sd", "FINE_TUNE"): "train_db.py",
    ("sd", "EMBEDDING"): "train_textual_inversion.py",
    ("sdxl", "LORA"): "sdxl_train_network.py",
    ("sdxl", "FINE_TUNE"): "sdxl_train.py",
    ("sdxl", "EMBEDDING"): "sdxl_train_textual_inversion.py",
}

OPTIMIZERS = {
    "ADAMW": "AdamW",
    "ADAMW_8BIT": "AdamW8bit",
    "ADAM": "torch.optim.Adam",
    "ADAM_8BIT": "bitsandbytes.optim.Adam8bit",
    "ADAFACTOR": "Adafactor",
    "PRODIGY": "Prodigy",
    "LION": "Lion",
    "LION_8BIT": "Lion8bit",
    "SGD": "torch.optim.SGD",
    "SGD_8BIT": "bitsandbytes.optim.SGD8bit",
    "ADAGRAD": "torch.optim.Adagrad",
    "ADAGRAD_8BIT": "bitsandbytes.optim.Adagrad8bit",
    "RMSPROP": "torch.optim.RMSprop",
    "RMSPROP_8BIT": "bitsandbytes.optim.RMSprop8bit",
    "LAMB": "bitsandbytes.optim.LAMB",
    "LAMB_8BIT": "bitsandbytes.optim.LAMB8bit",
    "LARS": "bitsandbytes.optim.LARS",
    "LARS_8BIT": "bitsandbytes.optim.LARS8bit",
    "DADAPT_ADA_GRAD": "DAdaptAdaGrad",
    "DADAPT_ADAM": "DAdaptAdam",
    "DADAPT_ADAN": "DAdaptAdan",
    "DADAPT_LION": "DAdaptLion",
    "DADAPT_SGD": "DAdaptSGD",
    "SCHEDULE_FREE_ADAMW": "AdamWScheduleFree",
    "SCHEDULE_FREE_SGD": "SGDScheduleFree",
}

# optimizer.<key> forwarded as an optimizer argument (betas are joined), per optimizer family.
_ADAM_ARGS = ("eps", "weight_decay", "amsgrad")
OPTIMIZER_ARGS: dict[str, tuple[str, ...]] = {
    "ADAMW": _ADAM_ARGS,
    "ADAMW_8BIT": ("eps", "weight_decay", "amsgrad", "min_8bit_size", "percentile_clipping", "block_wise"),
    "ADAM": _ADAM_ARGS,
    "ADAM_8BIT": ("eps", "weight_decay", "amsgrad", "min_8bit_size", "percentile_clipping", "block_wise"),
    "ADAFACTOR": (
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "scale_parameter",
        "relative_step",
        "warmup_init",
    ),
    "PRODIGY": (
        "eps",
        "weight_decay",
        "beta3",
        "decouple",
        "use_bias_correction",
        "safeguard_warmup",
        "d0",
        "d_coef",
        "growth_rate",
    ),
    "LION": ("weight_decay",),
    "LION_8BIT": ("weight_decay", "min_8bit_size", "percentile_clipping", "block_wise"),
    "SGD": ("momentum", "dampening", "weight_decay", "nesterov"),
    "SGD_8BIT": ("momentum", "dampening", "weight_decay", "nesterov"),
    "ADAGRAD": ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "RMSPROP": ("alpha", "eps", "weight_decay", "momentum", "centered"),
    "DADAPT_ADAM": ("eps", "weight_decay", "decouple", "d0", "growth_rate"),
    "DADAPT_LION": ("weight_decay", "d0"),
    "DADAPT_SGD": ("momentum", "weight_decay", "d0", "growth_rate"),
    "DADAPT_ADAN": ("eps", "weight_decay", "d0", "growth_rate"),
    "DADAPT_ADA_GRAD": ("eps", "weight_decay", "d0", "growth_rate", "momentum"),
    "SCHEDULE_FREE_ADAMW": ("eps", "weight_decay", "r", "weight_lr_power"),
    "SCHEDULE_FREE_SGD": ("momentum", "weight_decay", "r", "weight_lr_power"),
}
TWO_BETAS = {
    "ADAMW",
    "ADAMW_8BIT",
    "ADAM",
    "ADAM_8BIT",
    "PRODIGY",
    "LION",
    "LION_8BIT",
    "DADAPT_ADAM",
    "DADAPT_LION",
    "SCHEDULE_FREE_ADAMW",
}
ADAFACTOR_BOOLS = ("scale_parameter", "relative_step", "warmup_init")

SCHEDULERS = {
    "LINEAR": "linear",
    "COSINE": "cosine",
    "COSINE_WITH_RESTARTS": "cosine_with_restarts",
    "COSINE_WITH_HARD_RESTARTS": "cosine_with_restarts",
    "ADAFACTOR": "adafactor",
}
PRECISION = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "no"}
SAVE_PRECISION = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "float"}
TIMESTEP_DISTRIBUTIONS = {"SIGMOID", "LOGIT_NORMAL", "HEAVY_TAIL", "COS_MAP"}
CADENCE = {"EPOCH": "epochs", "STEP": "steps"}
MINUTES = {"SECOND": 1 / 60, "MINUTE": 1.0, "HOUR": 60.0}


@dataclass
class Conversion:
    """What one OneTrainer config becomes: the script, its flags by section, the dataset TOML, the prompt lines,
    and the report lines (settings not mapped, and settings mapped with a difference)."""

    source: str
    script: str
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] | None = None
    unmapped: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)


class Mapper:
    """Walks one config, recording which keys were read so the leftovers can be listed."""

    def __init__(self, config: OneTrainerConfig, script: str) -> None:
        self.config = config
        self.used: set[str] = set()
        self.out = Conversion(str(config.path), script)

    def get(self, key: str) -> Any:
        """The setting (file value or OneTrainer's default), marked as handled; a value of the wrong type for its
        default (text for a number, a number for a switch) is a UserError naming the key."""
        self.used.add(key)
        value, default = self.config.get(key), TRAIN_DEFAULTS.get(key)
        if value is None or default is None or value == default:
            return value
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default)) or (key == "resolution" and isinstance(value, int))
        if not ok:
            kind = {bool: "true or false", int: "a number", float: "a number", str: "text"}.get(type(default), "a list")
            raise UserError(f"{self.config.path}: {key} = {value!r} must be {kind}; fix it in OneTrainer or the file")
        return value

    def set(self, section: str, key: str, value: Any) -> None:
        """Write our flag ``key`` in config-TOML ``section``."""
        self.out.flags.setdefault(section, {})[key] = value

    def unmapped(self, key: str, reason: str, value: Any = None) -> None:
        """List ``key`` as not converted, with why."""
        self.used.add(key)
        shown = self.config.get(key) if value is None else value
        self.out.unmapped.append(f"{key} = {_show(shown)}: {reason}")

    def approx(self, key: str, text: str) -> None:
        """List ``key`` as converted with a difference, saying which."""
        self.out.approximate.append(f"{key} = {_show(self.config.get(key))}: {text}")

    def leftovers(self) -> None:
        """List every set, non-default key nobody read, except those with no effect here."""
        for key, value in self.config.given.items():
            if key in self.used or not self.config.is_set(key):
                continue
            if key not in TRAIN_DEFAULTS and value in (None, False, "", 0, [], {}):
                continue
            if key in UNSUPPORTED:
                self.unmapped(key, UNSUPPORTED[key])
            elif key.startswith(NO_EFFECT_PREFIXES) or key.endswith(NO_EFFECT_SUFFIXES):
                continue
            elif key.startswith("optimizer."):
                if value not in (None, False, "", {}):
                    self.unmapped(
                        key,
                        f"not passed on: {self.out.flags['optimizer']['optimizer_type']} is given "
                        "only the arguments it shares with OneTrainer's",
                    )
            else:
                self.unmapped(key, "no equivalent here")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def number(value: float) -> int | float:
    """Whole floats as ints (``2.0`` -> ``2``), for tidy TOML."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
