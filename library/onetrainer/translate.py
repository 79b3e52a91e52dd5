"""Translate a OneTrainer config with the tables of :mod:`library.onetrainer.mapping` (model, output, optimizer,
schedule, trained parts and their training windows, network or embedding, loss and noise, cadences, EMA and
validation), then list what was left over."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from library.errors import UserError
from library.onetrainer.concepts import concept_subsets, random_augmentations, sample_lines
from library.onetrainer.config import OneTrainerConfig
from library.onetrainer.extras import map_ema, map_validation, map_windows, note_hub_token
from library.onetrainer.mapping import (
    ADAFACTOR_BOOLS,
    CADENCE,
    CONDITIONED,
    MINUTES,
    NOT_YET,
    OPTIMIZER_ARGS,
    OPTIMIZERS,
    PRECISION,
    SAVE_PRECISION,
    SCHEDULERS,
    SCRIPTS,
    SD1,
    SD2_EPS,
    SD2_V,
    SDXL,
    TIMESTEP_DISTRIBUTIONS,
    TWO_BETAS,
    UNSUPPORTED,
    Conversion,
    Mapper,
    number,
)


def _family(model_type: str) -> str:
    if model_type in SD1 or model_type in SD2_V or model_type in SD2_EPS:
        return "sd"
    if model_type in SDXL:
        return "sdxl"
    raise UserError(
        f"model_type {model_type}: only Stable Diffusion 1.x, 2.x and SDXL train here; this converter cannot "
        "translate it"
    )


def script_for(config: OneTrainerConfig) -> str:
    """The entry script for the config's model type and training method."""
    method = config.get("training_method")
    family = _family(config.get("model_type"))
    if (family, method) not in SCRIPTS:
        raise UserError(f"{config.path}: training_method {method} is not supported (LORA, FINE_TUNE and EMBEDDING are)")
    return SCRIPTS[(family, method)]


def convert(config: OneTrainerConfig) -> Conversion:
    """Translate one OneTrainer config; see the module docstring."""
    m = Mapper(config, script_for(config))
    method = m.get("training_method")
    _model(m)
    _output(m, method)
    _data(m)
    _optimizer(m)
    _schedule(m, method)
    _parts(m, method)
    if method == "LORA":
        _network(m)
    elif method == "EMBEDDING":
        _embedding(m)
    _loss_and_noise(m)
    _cadence(m)
    map_ema(m)
    note_hub_token(m)
    general, datasets = concept_subsets(m, config.concepts, map_validation(m))
    if m.config.get("text_encoder.dropout_probability"):
        general["caption_dropout_rate"] = float(m.config.get("text_encoder.dropout_probability"))
    m.out.dataset = {"general": general, "datasets": datasets}
    if config.samples is not None:
        m.out.prompts = sample_lines(m, config.samples, config.get("model_type"))
    m.out.unmapped.extend(config.notes)
    m.leftovers()
    return m.out


def _model(m: Mapper) -> None:
    model_type = m.get("model_type")
    m.set("model", "pretrained_model_name_or_path", m.get("base_model_name"))
    if model_type in CONDITIONED:
        m.unmapped(
            "model_type",
            f"{CONDITIONED[model_type]} UNets (extra input channels) are not trained here; the files below train "
            "the model as a plain text-to-image model",
        )
    if model_type in SD2_V or model_type in SD2_EPS:
        m.set("model", "v2", True)
    v_pred = model_type in SD2_V
    if m.get("force_v_prediction"):
        v_pred = True
    if m.get("force_epsilon_prediction"):
        v_pred = False
    if v_pred:
        m.set("model", "v_parameterization", True)
    if m.get("vae.model_name"):
        m.set("model", "vae", m.get("vae.model_name"))
    train_dtype = m.get("train_dtype")
    if train_dtype in PRECISION:
        m.set("model", "mixed_precision", PRECISION[train_dtype])
    else:
        m.unmapped("train_dtype", "only fp16, bf16 and float32 training; set --mixed_precision yourself")
    if m.get("vae.weight_dtype") == "FLOAT_32" and PRECISION.get(train_dtype, "no") != "no":
        m.set("model", "no_half_vae", True)
    attention = m.get("attention_mechanism")
    if attention in ("SDP", "FLASH", "CUDNN"):
        m.set("model", "sdpa", True)
    elif attention == "XFORMERS":
        m.set("model", "xformers", True)
    elif attention not in ("DEFAULT", None):
        m.unmapped("attention_mechanism", "only --sdpa and --xformers; PyTorch's default attention is used")
    if m.get("compile"):
        m.set("model", "torch_compile", True)
    if m.get("unet.gradient_checkpointing") or m.get("text_encoder.gradient_checkpointing"):
        m.set("model", "gradient_checkpointing", True)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if m.get(f"{part}.offload_fraction") or m.get(f"{part}.activation_offloading"):
            m.unmapped(f"{part}.offload_fraction", "layer and activation offloading are not supported")
    skip = m.get("text_encoder_layer_skip")
    if skip and m.config.get("model_type") not in SDXL:
        m.set("model", "clip_skip", int(skip) + 1)
    elif skip:
        m.unmapped("text_encoder_layer_skip", "SDXL uses each encoder's penultimate layer; --clip_skip has no effect")


def _output(m: Mapper, method: str) -> None:
    destination = PurePosixPath(str(m.get("output_model_destination")).replace("\\", "/"))
    m.set("saving", "output_dir", str(destination.parent))
    m.set("saving", "output_name", destination.stem if destination.suffix else destination.name)
    fmt = m.get("output_model_format")
    if method == "FINE_TUNE":
        if fmt == "DIFFUSERS":
            m.set("saving", "save_model_as", "diffusers")
        elif fmt in ("ORIGINAL_SINGLE_FILE", "SAFETENSORS", "LEGACY_SAFETENSORS"):
            m.set("saving", "save_model_as", "safetensors")
        else:
            m.unmapped("output_model_format", "saved as a single .safetensors file instead")
            m.set("saving", "save_model_as", "safetensors")
    else:
        m.set("saving", "save_model_as", "safetensors")
        if method == "LORA" and fmt != "KOHYA_LORA":
            m.approx("output_model_format", "written with kohya's LoRA keys (OneTrainer's KOHYA_LORA)")
    output_dtype = m.get("output_dtype")
    if output_dtype in SAVE_PRECISION:
        m.set("saving", "save_precision", SAVE_PRECISION[output_dtype])
    else:
        m.unmapped("output_dtype", "saved as float32/fp16/bf16 only")


def _data(m: Mapper) -> None:
    m.set("training", "max_train_epochs", int(m.get("epochs")))
    m.set("training", "gradient_accumulation_steps", int(m.get("gradient_accumulation_steps")))
    m.set("training", "max_data_loader_n_workers", int(m.get("dataloader_threads")))
    if m.get("latent_caching"):
        changing = random_augmentations(m.config.concepts)
        if changing:
            m.approx(
                "latent_caching",
                f"latents are not cached: the random rotation or colour jitter of {', '.join(changing)} changes "
                "the image every step",
            )
        else:
            m.set("training", "cache_latents_to_disk", True)


def _optimizer(m: Mapper) -> None:
    name = m.get("optimizer.optimizer")
    if name not in OPTIMIZERS:
        m.unmapped("optimizer.optimizer", "no such optimizer here; AdamW is written instead")
        name = "ADAMW"
    m.set("optimizer", "optimizer_type", OPTIMIZERS[name])
    args: list[str] = []
    b1, b2 = m.get("optimizer.beta1"), m.get("optimizer.beta2")
    if name in TWO_BETAS and (b1 is not None or b2 is not None):
        args.append(f"betas={b1 if b1 is not None else 0.9},{b2 if b2 is not None else 0.999}")
    for key in OPTIMIZER_ARGS.get(name, ()):
        value = m.get(f"optimizer.{key}")
        if name == "ADAFACTOR" and key in ADAFACTOR_BOOLS:
            args.append(f"{key}={bool(value)}")
        elif key == "eps" and name == "ADAFACTOR" and (value is not None or m.config.get("optimizer.eps2")):
            eps2 = m.get("optimizer.eps2")
            args.append(f"eps={value if value is not None else 1e-30},{eps2 if eps2 is not None else 1e-3}")
        elif value not in (None, False):
            args.append(f"{key}={value}")
    if args:
        m.set("optimizer", "optimizer_args", args)
    if m.get("optimizer.fused_back_pass"):
        m.set("optimizer", "fused_backward_pass", True)
    clip = m.get("clip_grad_norm")
    m.set("optimizer", "max_grad_norm", float(clip) if clip is not None else 0.0)


def _schedule(m: Mapper, method: str) -> None:
    lr = m.get("learning_rate")
    if method == "EMBEDDING" and m.get("embedding_learning_rate") is not None:
        lr = m.get("embedding_learning_rate")
    m.set("optimizer", "learning_rate", lr)
    scheduler = m.get("learning_rate_scheduler")
    warmup = m.get("learning_rate_warmup_steps") or 0
    if scheduler == "CONSTANT":
        m.set("optimizer", "lr_scheduler", "constant_with_warmup" if warmup else "constant")
    elif scheduler in SCHEDULERS:
        m.set("optimizer", "lr_scheduler", SCHEDULERS[scheduler])
        if scheduler == "COSINE_WITH_HARD_RESTARTS":
            m.approx("learning_rate_scheduler", "--lr_scheduler cosine_with_restarts (diffusers' hard restarts)")
    else:
        m.unmapped("learning_rate_scheduler", "no such scheduler here; constant is written instead")
        m.set("optimizer", "lr_scheduler", "constant_with_warmup" if warmup else "constant")
    if warmup:
        m.set("optimizer", "lr_warmup_steps", number(float(warmup)))
    cycles = m.get("learning_rate_cycles")
    if scheduler in ("COSINE_WITH_RESTARTS", "COSINE_WITH_HARD_RESTARTS"):
        m.set("optimizer", "lr_scheduler_num_cycles", max(1, round(float(cycles))))
        if float(cycles) != round(float(cycles)):
            m.approx("learning_rate_cycles", "rounded: --lr_scheduler_num_cycles takes whole cycles")
    min_factor = m.get("learning_rate_min_factor")
    if min_factor:
        m.set("optimizer", "lr_scheduler_min_lr_ratio", float(min_factor))


def _parts(m: Mapper, method: str) -> None:
    """Which parts train, their learning rates and weight precisions."""
    script = m.out.script
    sdxl = script.startswith("sdxl")
    te_keys = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    te_train = [bool(m.get(f"{p}.train")) for p in te_keys]
    unet_train = bool(m.get("unet.train"))
    unet_lr = m.get("unet.learning_rate")
    te_lrs = [m.get(f"{p}.learning_rate") for p in te_keys]
    if method == "LORA":
        if not any(te_train):
            m.set("network", "network_train_unet_only", True)
        elif not unet_train:
            m.set("network", "network_train_text_encoder_only", True)
        if any(te_train) and not all(te_train):
            m.unmapped("text_encoder_2.train", "a LoRA trains both SDXL text encoders or neither")
        if unet_lr is not None:
            m.set("network", "unet_lr", unet_lr)
        if any(te_train) and any(lr is not None for lr in te_lrs):
            m.set("network", "text_encoder_lr", next(lr for lr in te_lrs if lr is not None))
            if len({lr for lr in te_lrs}) > 1:
                m.approx("text_encoder_2.learning_rate", "one --text_encoder_lr for both encoders")
    elif method == "FINE_TUNE":
        if not unet_train:
            m.unmapped("unet.train", "a fine-tune always trains the UNet")
        if unet_lr is not None:
            m.set("optimizer", "learning_rate", unet_lr)
        if sdxl:
            if any(te_train):
                m.set("model", "train_text_encoder", True)
            for _part, train, lr, flag in zip(te_keys, te_train, te_lrs, ("learning_rate_te1", "learning_rate_te2")):
                if any(te_train) and not train:
                    m.set("optimizer", flag, 0.0)
                elif lr is not None:
                    m.set("optimizer", flag, lr)
        else:
            if not te_train[0]:
                m.set("model", "stop_text_encoder_training", -1)
            elif te_lrs[0] is not None:
                m.set("optimizer", "learning_rate_te", te_lrs[0])
        weight = m.get("unet.weight_dtype")
        wanted = {"BFLOAT_16": "bf16", "FLOAT_16": "fp16"}.get(weight)
        if wanted and m.out.flags["model"].get("mixed_precision") != wanted:
            m.set("model", "mixed_precision", wanted)
            m.approx("train_dtype", f"--mixed_precision {wanted}: --full_{wanted} needs the same precision")
        if weight == "BFLOAT_16":
            m.set("model", "full_bf16", True)
            if m.get("optimizer.stochastic_rounding"):
                m.approx("optimizer.stochastic_rounding", "not supported: bf16 weights are rounded to nearest")
        elif weight == "FLOAT_16":
            m.set("model", "full_fp16", True)
        elif weight != "FLOAT_32":
            m.unmapped("unet.weight_dtype", "trained weights are float32, bf16 (--full_bf16) or fp16 (--full_fp16)")
    else:
        m.get("unet.train")
    trains_parts = method != "EMBEDDING"
    map_windows(m, unet_train and trains_parts, [(p, t and trains_parts) for p, t in zip(te_keys, te_train)])
    if method != "FINE_TUNE":
        weight = m.get("unet.weight_dtype")
        if weight == "FLOAT_8":
            m.set("model", "fp8_base", True)
        elif weight not in ("FLOAT_16", "BFLOAT_16", "FLOAT_32"):
            m.unmapped("unet.weight_dtype", "frozen weights are held in the mixed precision or float8 (--fp8_base)")
    dropout = m.get("text_encoder.dropout_probability")
    if dropout:
        m.approx(
            "text_encoder.dropout_probability",
            f"caption_dropout_rate = {dropout} drops the whole caption (OneTrainer drops each encoder's text apart)",
        )


def _network(m: Mapper) -> None:
    peft = m.get("peft_type")
    modules = {"LORA": "networks.lora", "LOHA": "networks.loha", "LOKR": "networks.lokr"}
    if peft not in modules:
        m.unmapped(
            "peft_type",
            "OneTrainer's OFT v2 is not supported (networks.oft is sd-scripts' different OFT); "
            "a LoRA is written instead",
        )
    m.set("network", "network_module", modules.get(peft, "networks.lora"))
    m.set("network", "network_dim", int(m.get("lora_rank")))
    m.set("network", "network_alpha", number(float(m.get("lora_alpha"))))
    args: list[str] = []
    if m.get("lora_decompose"):
        args.append("dora_wd=true")
    if peft == "LOKR":
        if m.get("lokr_decompose_factor") != -1:
            args.append(f"factor={m.get('lokr_decompose_factor')}")
        if m.get("lokr_decompose_both"):
            args.append("decompose_both=true")
        if m.get("lokr_full_matrix"):
            args.append("full_matrix=true")
        if m.get("lokr_use_tucker"):
            args.append("use_tucker=true")
    preset = m.get("layer_filter_preset")
    if m.get("layer_filter") and preset not in ("attn-mlp", "attn-only", "full"):
        m.unmapped("layer_filter", UNSUPPORTED["layer_filter"])
    elif preset == "full":
        args.append("preset=full")
    elif preset == "attn-only":
        args.append("preset=attn-only")
    elif preset != "attn-mlp":
        m.unmapped("layer_filter_preset", "only attn-mlp (the default targets), attn-only and full")
    if args:
        m.set("network", "network_args", args)
    dropout = m.get("dropout_probability")
    if dropout:
        m.set("network", "network_dropout", float(dropout))
    if m.get("lora_model_name"):
        m.set("network", "network_weights", m.get("lora_model_name"))


def _embedding(m: Mapper) -> None:
    m.set("embedding", "token_string", m.get("embedding.placeholder"))
    m.set("embedding", "init_word", m.get("embedding.initial_embedding_text"))
    m.set("embedding", "num_vectors_per_token", int(m.get("embedding.token_count") or 1))
    if m.get("embedding.model_name"):
        m.set("embedding", "weights", m.get("embedding.model_name"))
    m.get("embedding.train")


def _loss_and_noise(m: Mapper) -> None:
    strengths = {k: float(m.get(k)) for k in ("mse_strength", "mae_strength", "log_cosh_strength", "huber_strength")}
    if strengths != {"mse_strength": 1.0, "mae_strength": 0.0, "log_cosh_strength": 0.0, "huber_strength": 0.0}:
        for key, value in strengths.items():
            # our huber term is the pseudo-Huber 2c(sqrt(d^2+c^2)-c), about twice OneTrainer's Huber(delta=c)
            m.set("loss", key, number(value / 2 if key == "huber_strength" else value))
    if strengths["huber_strength"]:
        m.set("loss", "huber_c", float(m.get("huber_delta")))
        m.set("loss", "huber_schedule", "constant")
        m.approx(
            "huber_strength",
            "pseudo-Huber (smooth) instead of Huber, at half the strength because ours is about twice as large",
        )
    fn = m.get("loss_weight_fn")
    strength = m.get("loss_weight_strength")
    if fn == "MIN_SNR_GAMMA":
        m.set("loss", "min_snr_gamma", number(float(strength)))
    elif fn == "DEBIASED_ESTIMATION":
        m.set("loss", "debiased_estimation_loss", True)
    elif fn == "P2":
        m.set("loss", "p2_loss_weight_gamma", number(float(strength)))
    elif fn != "CONSTANT":
        m.unmapped("loss_weight_fn", "not supported (min-SNR, debiased estimation and P2 are)")
    if m.get("masked_training"):
        m.set("loss", "masked_loss", True)
        m.set("loss", "unmasked_probability", float(m.get("unmasked_probability")))
        m.set("loss", "unmasked_weight", float(m.get("unmasked_weight")))
        if m.get("normalize_masked_area_loss"):
            m.set("loss", "normalize_masked_area_loss", True)
    else:
        for key in ("unmasked_probability", "unmasked_weight", "normalize_masked_area_loss"):
            m.get(key)
    offset = m.get("offset_noise_weight")
    if offset:
        m.set("noise", "noise_offset", float(offset))
    perturbation = m.get("perturbation_noise_weight")
    if perturbation:
        m.set("noise", "ip_noise_gamma", float(perturbation))
    if m.get("rescale_noise_scheduler_to_zero_terminal_snr"):
        m.set("noise", "zero_terminal_snr", True)
    distribution = m.get("timestep_distribution")
    if distribution in TIMESTEP_DISTRIBUTIONS:
        m.set("noise", "timestep_distribution", distribution.lower())
    elif distribution != "UNIFORM":
        m.unmapped("timestep_distribution", "not supported (uniform, sigmoid, logit_normal, heavy_tail, cos_map are)")
    low, high = float(m.get("min_noising_strength")), float(m.get("max_noising_strength"))
    if (low, high) != (0.0, 1.0):
        m.set("noise", "min_noising_strength", number(low))
        m.set("noise", "max_noising_strength", number(high))
    for key in ("noising_weight", "noising_bias"):
        value = m.get(key)
        if value:
            m.set("noise", key, float(value))


def _cadence_flag(m: Mapper, value_key: str, unit_key: str, what: str) -> str | None:
    """``--<what>_every_n_epochs/steps`` for an EPOCH/STEP cadence (samples: ``--sample_every_n_minutes`` for a time
    unit; model saves on the clock are listed), NEVER writes nothing."""
    value, unit = m.get(value_key), m.get(unit_key)
    if unit == "NEVER" or not value:
        return None
    if unit in CADENCE:
        flag = f"{what}_every_n_{CADENCE[unit]}"
        m.set("saving" if what == "save" else "sampling", flag, int(value))
        return flag
    if what == "sample" and unit in MINUTES:
        m.set("sampling", "sample_every_n_minutes", number(float(value) * MINUTES[unit]))
        return "sample_every_n_minutes"
    m.unmapped(
        value_key,
        f"a {what} cadence in {unit.lower()}s is {NOT_YET} (only epochs or steps: --{what}_every_n_epochs/steps)",
        f"{value} {unit}",
    )
    return None


def _cadence(m: Mapper) -> None:
    saving = _cadence_flag(m, "save_every", "save_every_unit", "save")
    backup_unit, backup = m.get("backup_after_unit"), m.get("backup_after")
    if backup_unit in CADENCE and backup:
        flag = f"save_every_n_{CADENCE[backup_unit]}"
        if saving is not None and saving != flag:
            m.unmapped(
                "backup_after",
                "backups are saved with each model (--save_state): one cadence for both",
                f"{backup} {backup_unit}",
            )
        else:
            m.set("saving", flag, int(backup))
            m.set("saving", "save_state", True)
            if m.get("rolling_backup"):
                m.set("saving", f"save_last_n_{CADENCE[backup_unit]}_state", int(m.get("rolling_backup_count")))
    elif backup_unit in MINUTES and backup:
        m.set("saving", "backup_every_n_minutes", number(float(backup) * MINUTES[backup_unit]))
        if m.get("rolling_backup"):
            m.set("saving", "backup_keep_last", int(m.get("rolling_backup_count")))
    elif backup_unit != "NEVER" and backup:
        unit = backup_unit.lower()
        m.unmapped("backup_after", f"a backup cadence in {unit}s is not supported", f"{backup} {backup_unit}")
    m.get("rolling_backup")
    m.get("rolling_backup_count")
    if m.get("backup_before_save"):
        m.set("saving", "save_state_on_train_end", True)
    if m.get("continue_last_backup"):
        m.set("saving", "resume", "latest")
    if m.config.samples:
        _cadence_flag(m, "sample_after", "sample_after_unit", "sample")
    if m.get("tensorboard"):
        m.set("logging", "log_with", "tensorboard")
        m.set("logging", "logging_dir", re.sub(r"/+$", "", str(m.get("workspace_dir"))) + "/tensorboard")
