"""OneTrainer's training config as a flat, default-filled view, with its concepts and samples resolved.

Key names, defaults and enum values were read from OneTrainer's ``modules/util/config/TrainConfig.py``,
``ConceptConfig.py`` and ``SampleConfig.py`` (commit 23df383). Nested parts (``unet``, ``text_encoder``,
``optimizer``, ``embedding``, ...) are flattened to dotted keys such as ``unet.learning_rate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

# TrainModelPartConfig defaults (unet, text_encoder, vae, ...).
PART_DEFAULTS: dict[str, Any] = {
    "model_name": "",
    "include": True,
    "train": True,
    "stop_training_after": None,
    "stop_training_after_unit": "NEVER",
    "learning_rate": None,
    "weight_dtype": "FLOAT_32",
    "dropout_probability": 0.0,
    "train_embedding": True,
    "attention_mask": False,
    "guidance_scale": 1.0,
    "gradient_checkpointing": True,
    "offload_fraction": 0.0,
    "activation_offloading": False,
}

# The few TrainOptimizerConfig fields whose default is not None/False.
OPTIMIZER_TRUE_DEFAULTS = (
    "stochastic_rounding weight_decay_by_lr split_groups split_groups_mean factored factored_fp32 "
    "use_stableadamw d_limiter use_schedulefree rms_rescaling"
).split()

TRAIN_DEFAULTS: dict[str, Any] = {
    "training_method": "FINE_TUNE",
    "model_type": "STABLE_DIFFUSION_15",
    "debug_mode": False,
    "tensorboard": True,
    "workspace_dir": "workspace/run",
    "validation": False,
    "validate_after": 1,
    "validate_after_unit": "EPOCH",
    "continue_last_backup": False,
    "multi_gpu": False,
    "base_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "output_dtype": "FLOAT_32",
    "output_model_format": "SAFETENSORS",
    "output_model_destination": "models/model.safetensors",
    "force_circular_padding": False,
    "compile": False,
    "concept_file_name": "training_concepts/concepts.json",
    "concepts": None,
    "aspect_ratio_bucketing": True,
    "latent_caching": True,
    "learning_rate_scheduler": "CONSTANT",
    "custom_learning_rate_scheduler": None,
    "scheduler_params": [],
    "learning_rate": 3e-6,
    "learning_rate_warmup_steps": 200.0,
    "learning_rate_cycles": 1.0,
    "learning_rate_min_factor": 0.0,
    "epochs": 100,
    "batch_size": 1,
    "gradient_accumulation_steps": 1,
    "ema": "OFF",
    "ema_decay": 0.999,
    "ema_update_step_interval": 5,
    "dataloader_threads": 2,
    "train_dtype": "FLOAT_16",
    "fallback_train_dtype": "BFLOAT_16",
    "only_cache": False,
    "resolution": "512",
    "attention_mechanism": "SDP",
    "mse_strength": 1.0,
    "mae_strength": 0.0,
    "log_cosh_strength": 0.0,
    "huber_strength": 0.0,
    "huber_delta": 1.0,
    "loss_weight_fn": "CONSTANT",
    "loss_weight_strength": 5.0,
    "dropout_probability": 0.0,
    "loss_scaler": "NONE",
    "learning_rate_scaler": "NONE",
    "clip_grad_norm": 1.0,
    "offset_noise_weight": 0.0,
    "generalized_offset_noise": False,
    "perturbation_noise_weight": 0.0,
    "rescale_noise_scheduler_to_zero_terminal_snr": False,
    "force_v_prediction": False,
    "force_epsilon_prediction": False,
    "min_noising_strength": 0.0,
    "max_noising_strength": 1.0,
    "timestep_distribution": "UNIFORM",
    "noising_weight": 0.0,
    "noising_bias": 0.0,
    "timestep_shift": 1.0,
    "dynamic_timestep_shifting": False,
    "text_encoder_layer_skip": 0,
    "text_encoder_2_layer_skip": 0,
    "text_encoder_2_sequence_length": 77,
    "masked_training": False,
    "unmasked_probability": 0.1,
    "unmasked_weight": 0.1,
    "normalize_masked_area_loss": False,
    "masked_prior_preservation_weight": 0.0,
    "custom_conditioning_image": False,
    "layer_filter": "",
    "layer_filter_preset": "full",
    "layer_filter_regex": False,
    "embedding_learning_rate": None,
    "preserve_embedding_norm": False,
    "additional_embeddings": [],
    "embedding_weight_dtype": "FLOAT_32",
    "embedding.model_name": "",
    "embedding.placeholder": "<embedding>",
    "embedding.train": True,
    "embedding.stop_training_after": None,
    "embedding.stop_training_after_unit": "NEVER",
    "embedding.token_count": 1,
    "embedding.initial_embedding_text": "*",
    "embedding.is_output_embedding": False,
    "peft_type": "LORA",
    "lora_model_name": "",
    "lora_rank": 16,
    "lora_alpha": 1.0,
    "lora_decompose": False,
    "lora_decompose_norm_epsilon": True,
    "lora_decompose_output_axis": False,
    "lora_weight_dtype": "FLOAT_32",
    "bundle_additional_embeddings": True,
    "oft_block_size": 32,
    "oft_block_share": False,
    "oft_scaled": False,
    "lokr_dim": 16,
    "lokr_decompose_both": False,
    "lokr_decompose_factor": -1,
    "lokr_use_tucker": False,
    "lokr_weight_decompose": False,
    "lokr_dora_on_output": True,
    "lokr_full_matrix": False,
    "lokr_vec_trick": True,
    "optimizer.optimizer": "ADAMW",
    "sample_definition_file_name": "training_samples/samples.json",
    "samples": None,
    "sample_after": 10,
    "sample_after_unit": "MINUTE",
    "sample_skip_first": 0,
    "non_ema_sampling": True,
    "backup_before_save": True,
    "backup_after": 30,
    "backup_after_unit": "MINUTE",
    "rolling_backup": False,
    "rolling_backup_count": 3,
    "save_every": 0,
    "save_every_unit": "NEVER",
    "save_skip_first": 0,
    "save_filename_prefix": "",
    **{f"optimizer.{name}": True for name in OPTIMIZER_TRUE_DEFAULTS},
    **{f"unet.{k}": v for k, v in PART_DEFAULTS.items()},
    "unet.stop_training_after": 0,
    **{f"text_encoder.{k}": v for k, v in PART_DEFAULTS.items()},
    "text_encoder.stop_training_after": 30,
    "text_encoder.stop_training_after_unit": "EPOCH",
    **{f"text_encoder_2.{k}": v for k, v in PART_DEFAULTS.items()},
    "text_encoder_2.stop_training_after": 30,
    "text_encoder_2.stop_training_after_unit": "EPOCH",
    **{f"vae.{k}": v for k, v in PART_DEFAULTS.items()},
}

CONCEPT_DEFAULTS: dict[str, Any] = {
    "name": "",
    "path": "",
    "enabled": True,
    "type": "STANDARD",
    "include_subdirectories": False,
    "image_variations": 1,
    "text_variations": 1,
    "balancing": 1.0,
    "balancing_strategy": "REPEATS",
    "loss_weight": 1.0,
    "image.enable_crop_jitter": True,
    "image.enable_random_flip": False,
    "image.enable_fixed_flip": False,
    "image.enable_random_rotate": False,
    "image.enable_fixed_rotate": False,
    "image.random_rotate_max_angle": 0.0,
    **{
        f"image.{kind}_{name}": value
        for name in ("brightness", "contrast", "saturation", "hue")
        for kind, value in (("enable_random", False), ("enable_fixed", False))
    },
    **{f"image.random_{name}_max_strength": 0.0 for name in ("brightness", "contrast", "saturation", "hue")},
    "image.enable_resolution_override": False,
    "image.resolution_override": "512",
    "image.enable_random_circular_mask_shrink": False,
    "image.enable_random_mask_rotate_crop": False,
    "text.prompt_source": "sample",
    "text.prompt_path": "",
    "text.enable_tag_shuffling": False,
    "text.tag_delimiter": ",",
    "text.keep_tags_count": 1,
    "text.tag_dropout_enable": False,
    "text.tag_dropout_mode": "FULL",
    "text.tag_dropout_probability": 0.0,
    "text.tag_dropout_special_tags_mode": "NONE",
    "text.tag_dropout_special_tags": "",
    "text.tag_dropout_special_tags_regex": False,
    "text.caps_randomize_enable": False,
    "text.caps_randomize_mode": "capslock, title, first, random",
    "text.caps_randomize_probability": 0.0,
    "text.caps_randomize_lowercase": False,
}

SAMPLE_KEYS = (
    "enabled prompt negative_prompt height width frames length seed random_seed diffusion_steps cfg_scale "
    "noise_scheduler text_encoder_1_layer_skip text_encoder_1_sequence_length text_encoder_2_layer_skip "
    "text_encoder_2_sequence_length text_encoder_3_layer_skip text_encoder_4_layer_skip transformer_attention_mask "
    "force_last_timestep sample_inpainting base_image_path mask_image_path"
).split()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys; lists and other values are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class OneTrainerConfig:
    """A OneTrainer config: ``given`` holds the keys the file sets (dotted), ``concepts`` and ``samples`` the
    flattened entries (None for samples when no sample definitions were found), with where each came from."""

    path: Path
    given: dict[str, Any]
    concepts: list[dict[str, Any]]
    concepts_source: str
    samples: list[dict[str, Any]] | None
    samples_source: str
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        """The file's value for ``key``, else OneTrainer's default (None where we don't know one)."""
        return self.given[key] if key in self.given else TRAIN_DEFAULTS.get(key)

    def is_set(self, key: str) -> bool:
        """Whether the file sets ``key`` to something other than OneTrainer's default."""
        return key in self.given and self.given[key] != TRAIN_DEFAULTS.get(key, _UNKNOWN)


_UNKNOWN = object()


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a missing or malformed file is a one-line UserError naming it and ``what`` it is."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what} ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the {what} is not valid JSON (line {e.lineno}: {e.msg})") from None


def _resolve(name: str, config_path: Path) -> Path:
    """A file named in the config: as given when absolute, else beside the config, else from the current folder."""
    path = Path(name)
    if path.is_absolute():
        return path
    beside = config_path.parent / path
    return beside if beside.exists() or not path.exists() else path


def _entries(value: Any, source: str, what: str) -> list[dict[str, Any]]:
    """A JSON list of objects (concepts or samples), each flattened; anything else is a UserError."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise UserError(f"{source}: the {what} must be a JSON list of objects")
    return [flatten(item) for item in value]


def load_onetrainer_config(
    path: str | Path, concept_file: str | Path | None = None, sample_file: str | Path | None = None
) -> OneTrainerConfig:
    """Read ``config.json``; concepts and samples come from the flags' files, else inline, else the files the
    config names (``concept_file_name``/``sample_definition_file_name``, resolved beside the config)."""
    path = Path(path)
    data = read_json(path, "OneTrainer config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a OneTrainer config (expected a JSON object of settings)")
    if "training_method" not in data and "model_type" not in data and "base_model_name" not in data:
        raise UserError(f"{path}: not a OneTrainer config (no training_method, model_type or base_model_name)")
    raw_concepts, raw_samples = data.get("concepts"), data.get("samples")
    given = flatten({k: v for k, v in data.items() if k not in ("concepts", "samples")})

    if concept_file is not None:
        source = str(concept_file)
        concepts = _entries(read_json(Path(concept_file), "concepts file (--concept_file)"), source, "concepts")
    elif raw_concepts is not None:
        source, concepts = f"{path} (inline concepts)", _entries(raw_concepts, str(path), "concepts")
    else:
        name = given.get("concept_file_name") or TRAIN_DEFAULTS["concept_file_name"]
        file = _resolve(name, path)
        if not file.exists():
            raise UserError(
                f"{path}: concept_file_name '{name}' not found (looked for {file}); pass the concepts JSON with "
                "--concept_file"
            )
        source = str(file)
        concepts = _entries(read_json(file, "concepts file (concept_file_name)"), source, "concepts")

    notes: list[str] = []
    if sample_file is not None:
        samples_source = str(sample_file)
        samples = _entries(read_json(Path(sample_file), "samples file (--sample_file)"), samples_source, "samples")
    elif raw_samples is not None:
        samples_source, samples = f"{path} (inline samples)", _entries(raw_samples, str(path), "samples")
    else:
        name = given.get("sample_definition_file_name") or TRAIN_DEFAULTS["sample_definition_file_name"]
        file = _resolve(name, path)
        samples_source = str(file)
        samples = None
        if file.exists():
            samples = _entries(read_json(file, "samples file"), samples_source, "samples")
        else:
            notes.append(f"sample_definition_file_name = {name}: not found ({file}); no sample-prompt file written")
    return OneTrainerConfig(path, given, concepts, source, samples, samples_source, notes)
