"""The start every training script shares: seed, base model, attention, dataset, step plan and the loop's parts,
read from the flags once (this module and the entry scripts are the edge; nothing below them sees the flags)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.config.dataset_config import DatasetFlags, dataset_flags, load_dataset_configs
from library.config.runtime_flags import (
    RuntimeSettings,
    apply_fp8_base,
    check_fp8,
    compile_unet,
    process_group_kwargs,
    runtime_notes,
)
from library.config.sdxl_flags import SD_FAMILIES
from library.config.settings import settings_from_flags
from library.dataset.loader import TrainDataset, build_datasets
from library.dataset.summary import DatasetSummary, summarize_dataset
from library.engine.attention import AttentionSettings, attention_from_settings
from library.engine.config import EngineConfig
from library.engine.data import BatchSource
from library.engine.loop import TrainResult
from library.engine.parts import TrainingParts
from library.engine.recipe import Recipe
from library.engine.schedule import RunPlan, make_run_plan
from library.engine.tracking import launch_device, launched_processes
from library.engine.validation import ValidationSettings, Validator, timesteps_for
from library.errors import UserError
from library.models.components import Components
from library.models.family import ModelFamily, TextEncoding
from library.noise import NoiseSettings, training_scheduler
from library.seeds import choose_seed
from library.text.encode import TextEncodingSettings
from library.text.output_cache import (
    OutputLayout,
    TextOutputCacheSettings,
    cache_text_outputs,
    check_text_output_cache,
)

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class ModelSource:
    """The base model to start from (flag names; build with ``settings_from_flags``)."""

    pretrained_model_name_or_path: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    allow_unsafe_pickle: bool = False
    disable_mmap_load_safetensors: bool = False


def model_source(args: argparse.Namespace) -> ModelSource:
    """The base model the flags name."""
    return settings_from_flags(ModelSource, args)


def load_base_model(source: ModelSource) -> Components:
    """``--pretrained_model_name_or_path`` with ``--v2`` / ``--v_parameterization`` / ``--vae`` (and the SDXL
    scripts' ``--disable_mmap_load_safetensors``)."""
    from library.models.load import load_model

    if not source.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a diffusers folder, repo id or model file")
    return load_model(
        source.pretrained_model_name_or_path,
        v2=source.v2,
        v_parameterization=source.v_parameterization,
        vae=source.vae,
        tokenizer_cache_dir=source.tokenizer_cache_dir,
        allow_unsafe_pickle=source.allow_unsafe_pickle,
        disable_mmap=source.disable_mmap_load_safetensors,
    )


@dataclass(frozen=True)
class PreparedRun:
    """What a script's recipe trains on, made once at start-up: the loop's settings with the run's one seed, the
    loaded model, the dataset with its latents, the run's one step plan, the dataset's summary and the loop's parts;
    the held-out images (``validation``, None when none) with their ``validator`` and its schedule (``validating``).
    """

    config: EngineConfig
    components: Components
    dataset: TrainDataset
    plan: RunPlan
    summary: DatasetSummary
    parts: TrainingParts
    validation: TrainDataset | None = None
    validator: Validator | None = None
    validating: ValidationSettings = ValidationSettings()

    def train(
        self,
        recipe: Recipe,
        *,
        tracker_name: str,
        parts: TrainingParts | None = None,
        source: BatchSource | None = None,
        summary: DatasetSummary | None = None,
    ) -> TrainResult:
        """The shared loop on this run; ``parts``/``source``/``summary`` replace the prepared ones where a recipe
        wraps them (textual inversion's templates). Skipped images are listed again at the end."""
        from library.engine.loop import train

        summary = summary or self.summary
        result = train(
            self.config,
            self.components,
            source or self.dataset,
            recipe,
            parts or self.parts,
            tracker_name=tracker_name,
            summary=summary.text,
            plan=self.plan,
            validator=self.validator,
            validating=self.validating,
        )
        if summary.skipped:
            logger.warning(summary.skipped_text)
        return result


def prepare_run(
    args: argparse.Namespace,
    styles: set[str],
    *,
    load: Callable[[int], Components] | None = None,
    text_embedding: bool = False,
    families: Collection[str] = SD_FAMILIES,
    text_trained_by: str | None = None,
) -> PreparedRun | None:
    """Seed, loop settings, base model (``load(seed)``, else the model the flags name; refused unless its family is
    one of ``families``), attention, fp8 storage and compilation, the dataset of ``styles`` with its latents cached
    across processes, the step plan and the loop's parts. ``text_embedding``: textual inversion trains the
    embedding through the whole text encoder, which therefore keeps full precision under --fp8_base (sd-scripts
    ignores --fp8_base there). ``text_trained_by``: the flag that trains a text encoder in this run, which
    --cache_text_encoder_outputs excludes.

    Returns None after ``--debug_dataset`` has printed the batches: sd-scripts then exits without training.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from library.engine.wiring import parts_from_args

    config = EngineConfig.from_args(args)
    runtime = settings_from_flags(RuntimeSettings, args)
    check_fp8(runtime)
    device = launch_device()
    processes = PartialState(
        cpu=device.type == "cpu" and launched_processes() > 1, **process_group_kwargs(config.distributed.ddp_timeout)
    )
    if config.hub_resume is not None:
        config = dataclasses.replace(config, resume=hub_state(config, processes))
    seed = choose_seed(args.seed, config.resume)
    config = dataclasses.replace(config, seed=seed)
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16: accelerate has no fp16 autocast on the CPU, so layers would meet float16 and "
            "float32 weights; use --mixed_precision bf16 or no on the CPU (fp16 needs a GPU)"
        )
    components = load(seed) if load is not None else load_base_model(model_source(args))
    check_family(components, families)
    note = half_vae_note(components.family, config.mixed_precision, config.no_half_vae)
    if note:
        logger.warning(note)
    attention_from_settings(settings_from_flags(AttentionSettings, args), components.unet, device)
    apply_fp8_base(runtime, components.unet, [] if text_embedding else components.text_encoders)
    compile_unet(components.unet, runtime)
    components.vae.to(device)
    log_process_group_timeout(config.distributed.ddp_timeout, processes.num_processes)
    flags = dataset_flags(args)
    text_cache = settings_from_flags(TextOutputCacheSettings, args)
    if text_cache.enabled:  # refused combinations fail before the latents are cached, not after
        configs = load_dataset_configs(flags, styles)
        check_text_output_cache(text_cache, configs, text_encoder_trained_by=text_trained_by)
    dataset, validation = build_datasets(
        flags,
        styles,
        components.vae,
        latents_npz_suffix=components.family.latents_npz_suffix,
        seed=seed,
        process_index=processes.process_index,
        num_processes=processes.num_processes,
        barrier=processes.wait_for_everyone,
        gather=lambda obj: gather_object([obj]),
    )
    _warn_unused_settings(runtime_notes(runtime, config.distributed, processes.num_processes), lowram=args.lowram)
    if flags.debug_dataset:
        from library.dataset.debug import debug_dataset

        debug_dataset(dataset, out_dir=args.debug_dataset_dir)
        return None
    plan = make_run_plan(
        dataset.batches_in_epoch(1),
        processes.num_processes,
        config.gradient_accumulation_steps,
        config.max_train_steps,
        config.max_train_epochs,
    )
    dataset = dataset.with_changes(plan=plan)
    parts = parts_from_args(args, components)
    if text_cache.enabled:
        text_id = f"{components.family.name}:{settings_from_flags(TextEncodingSettings, args)!r}"
        encode = cached_text_encoding(dataset, parts, components, text_cache, text_id, flags, processes, device)
        parts = dataclasses.replace(parts, encode_text=encode)
    validating = settings_from_flags(ValidationSettings, args)
    validator = validator_for(validation, components, args, validating) if validation is not None else None
    summary = summarize_dataset(dataset)
    if validation is not None:
        held = sum(len(r) for r in validation.records)
        summary = dataclasses.replace(
            summary.with_lines(f"validation: {held} image(s) held out, {len(validator or ())} forward passes"),
            num_validation_images=held,
        )
    return PreparedRun(config, components, dataset, plan, summary, parts, validation, validator, validating)


def validator_for(
    validation: TrainDataset, components: Components, args: argparse.Namespace, settings: ValidationSettings
) -> Validator:
    """The run's validator: the held-out batches (at most --max_validation_steps) at the fixed timesteps inside
    the training range (--min/--max_timestep, noising strengths), noised by the training scheduler."""
    noise = settings_from_flags(NoiseSettings, args, v_parameterization=components.v_parameterization)
    scheduler = training_scheduler(components.scheduler, noise.zero_terminal_snr)
    return Validator(
        validation,
        seed=validation.seed,
        max_steps=settings.max_validation_steps,
        timesteps=timesteps_for(noise, scheduler.config.num_train_timesteps),
        scheduler=scheduler,
        v_parameterization=components.v_parameterization,
    )


def hub_state(config: EngineConfig, processes: Any) -> Path:
    """--resume_from_huggingface: the state folder --resume names on the Hub, downloaded once per machine (the local
    main process first) to ``<output_dir>/hub-resume/<name>``."""
    from library.hub import download_state, parse_resume_spec

    spec = config.hub_resume
    dest = config.output_dir / "hub-resume" / parse_resume_spec(spec, config.hub).folder_name
    with processes.local_main_process_first():
        if processes.is_local_main_process:
            download_state(spec, config.hub, dest)
    return dest


def cached_text_encoding(
    dataset: TrainDataset,
    parts: TrainingParts,
    components: Components,
    settings: TextOutputCacheSettings,
    settings_id: str,
    flags: DatasetFlags,
    processes: Any,
    device: torch.device,
) -> TextEncoding:
    """--cache_text_encoder_outputs[_to_disk]: every caption encoded once on ``device`` before training (the
    family decides what depends on the caption only, e.g. not SDXL's size embedding), served from the cache;
    ``settings_id`` names the encoding settings, so changed ones re-encode files cached on disk.

    Captions are encoded in batches of the training batch size, as sd-scripts does: a matmul's rounding depends on
    its row count, so a cache encoded in batches of that size holds what live encoding would give."""
    for encoder in components.text_encoders:
        encoder.to(device)
    family = components.family
    return cache_text_outputs(
        dataset,
        parts.encode_text,
        components.text_encoders,
        components.tokenizers,
        settings_id=settings_id,
        to_disk=settings.cache_text_encoder_outputs_to_disk,
        layout=OutputLayout.per_encoder(components.text_encoders, extras=family.text_output_extras()),
        finish=family.finish_conditioning,
        batch_size=max(d.batch_size for d in dataset.datasets),
        skip_check=flags.skip_cache_check,
        process_index=processes.process_index,
        num_processes=processes.num_processes,
        barrier=processes.wait_for_everyone,
    )


def half_vae_note(family: ModelFamily, mixed_precision: str, no_half_vae: bool) -> str | None:
    """A warning for an fp16 run whose family's stock VAE overflows in float16 (SDXL) without --no_half_vae."""
    if not family.fp16_vae_overflows or mixed_precision != "fp16" or no_half_vae:
        return None
    return (
        f"--mixed_precision fp16 without --no_half_vae: the {family.name.upper()} VAE overflows in float16 (NaN "
        "latents and losses); add --no_half_vae, or give an fp16-safe VAE with --vae"
    )


def check_family(components: Components, families: Collection[str]) -> None:
    """Refuse a base model this script does not train: SDXL trains with the sdxl_* scripts, SD 1.x/2.x without."""
    family = components.family
    if family.name in families:
        return
    scripts = "the sdxl_* scripts" if family.name == "sdxl" else "the scripts without the sdxl_ prefix"
    raise UserError(
        f"{components.source or 'the base model'} is an {family.description} model, which this script does not "
        f"train; train it with {scripts} (e.g. {'sdxl_' if family.name == 'sdxl' else ''}train_network.py)"
    )


def log_process_group_timeout(ddp_timeout: int | None, num_processes: int) -> None:
    """With --ddp_timeout in a multi-process run: log the timeout torch's default process group really has."""
    if not ddp_timeout or num_processes < 2:
        return
    import torch.distributed as dist

    try:  # torch keeps the timeout on the group's backend object (private API): report what it holds
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        timeout = process_group_kwargs(ddp_timeout)["timeout"]
    logger.info(f"--ddp_timeout {ddp_timeout}: process group timeout {timeout}")


def _warn_unused_settings(notes: Sequence[str], *, lowram: bool) -> None:
    """Settings this toolkit accepts from sd-scripts users but does not act on (``notes``, --lowram): say so, never
    ignore silently."""
    for note in notes:
        logger.warning(note)
    if lowram:
        logger.warning("--lowram has no effect here: models are loaded on the CPU, then moved to the device once")
