"""The start every training script shares: the base model from the flags, attention, and the dataset with its steps."""

from __future__ import annotations

import argparse
import logging

import torch

from library.config.runtime_flags import (
    apply_fp8_base,
    check_fp8,
    compile_unet,
    process_group_kwargs,
    runtime_notes,
)
from library.dataset.loader import TrainDataset, build_train_dataset
from library.engine.attention import attention_from_args
from library.engine.tracking import launch_device, launched_processes
from library.errors import UserError
from library.models.components import Components

logger = logging.getLogger("sdtrain")


def load_base_model(args: argparse.Namespace) -> Components:
    """``--pretrained_model_name_or_path`` with ``--v2`` / ``--v_parameterization`` / ``--vae``."""
    from library.models.load import load_model

    check_fp8(args)
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: a diffusers folder, repo id or model file")
    return load_model(
        args.pretrained_model_name_or_path,
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        vae=args.vae,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
    )


def prepare_training_data(
    args: argparse.Namespace, styles: set[str], components: Components, seed: int
) -> TrainDataset | None:
    """Choose attention, store the base model in fp8 and compile the UNet when asked, build the dataset (latents
    cached with the work split across processes) and fix its steps.

    Returns None after ``--debug_dataset`` has printed the batches: sd-scripts then exits without training.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    device = launch_device()
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16: accelerate has no fp16 autocast on the CPU, so layers would meet float16 and "
            "float32 weights; use --mixed_precision bf16 or no on the CPU (fp16 needs a GPU)"
        )
    attention_from_args(args, components.unet, device)
    text_encoder = None if trains_text_embedding(args) else components.text_encoder
    apply_fp8_base(args, components.unet, text_encoder)
    compile_unet(components.unet, args)
    components.vae.to(device)
    processes = PartialState(cpu=device.type == "cpu" and launched_processes() > 1, **process_group_kwargs(args))
    log_process_group_timeout(args, processes.num_processes)
    dataset = build_train_dataset(
        args,
        styles,
        components.vae,
        seed=seed,
        process_index=processes.process_index,
        num_processes=processes.num_processes,
        barrier=processes.wait_for_everyone,
        gather=lambda obj: gather_object([obj]),
    )
    _warn_unused_settings(args, dataset, processes.num_processes)
    if args.debug_dataset:
        from library.dataset.debug import debug_dataset

        debug_dataset(dataset, out_dir=args.debug_dataset_dir)
        return None
    dataset = dataset.with_changes(
        num_processes=launched_processes(), gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    steps = args.max_train_steps
    if args.max_train_epochs is not None:
        steps = args.max_train_epochs * dataset.epoch_start_step(2)  # optimizer steps of one epoch, times epochs
    return dataset.with_changes(max_train_steps=steps)


def trains_text_embedding(args: argparse.Namespace) -> bool:
    """Textual inversion (its parser has --token_string) trains the text encoder's embedding through the whole
    encoder, which therefore keeps full precision under --fp8_base (sd-scripts ignores --fp8_base there)."""
    return hasattr(args, "token_string")


def log_process_group_timeout(args: argparse.Namespace, num_processes: int) -> None:
    """With --ddp_timeout in a multi-process run: log the timeout torch's default process group really has."""
    if not getattr(args, "ddp_timeout", None) or num_processes < 2:
        return
    import torch.distributed as dist

    try:  # torch keeps the timeout on the group's backend object (private API): report what it holds
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        timeout = process_group_kwargs(args)["timeout"]
    logger.info(f"--ddp_timeout {args.ddp_timeout}: process group timeout {timeout}")


def _warn_unused_settings(args: argparse.Namespace, dataset: TrainDataset, num_processes: int = 1) -> None:
    """Settings this toolkit accepts from sd-scripts users but does not act on yet: say so, never ignore silently."""
    for note in runtime_notes(args, num_processes):
        logger.warning(note)
    if getattr(args, "lowram", False):
        logger.warning("--lowram has no effect here: models are loaded on the CPU, then moved to the device once")
    split = [d.name for d in dataset.datasets if d.validation_split > 0]
    if split:
        logger.warning(
            "%s: validation_split is not implemented yet; no images are held out and no validation loss is logged",
            ", ".join(split),
        )
