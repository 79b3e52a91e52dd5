"""sd-scripts' runtime flags: torch.compile, fp8 base weights, DDP and DeepSpeed settings, memory hints.

Names, types, choices and defaults follow sd-scripts (``train_util.add_training_arguments``,
``deepspeed_utils.add_deepspeed_arguments`` and ``train_network.py``). The functions below turn the parsed flags into
what accelerate and torch take (compile options, process-group and DDP kwargs, a DeepSpeed plugin) and apply fp8
storage to the frozen base model; each is a plain function of typed settings (:class:`RuntimeSettings`, or the
engine's config for the DDP and DeepSpeed parts) so it can be checked on its own.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from library.config.values import Range
from library.errors import UserError

logger = logging.getLogger("sdtrain")

DYNAMO_BACKENDS = [
    "eager",
    "aot_eager",
    "inductor",
    "aot_ts_nvfuser",
    "nvprims_nvfuser",
    "cudagraphs",
    "ofi",
    "fx2trt",
    "onnxrt",
    "tensort",
    "ipex",
    "tvm",
    "no",  # not an sd-scripts choice, but kohya_ss writes dynamo_backend = "no" into every config it saves
]
DDP_TIMEOUT_MINUTES = Range(int, 0, 60 * 24 * 30)  # 0 (as unset): torch's default, as in sd-scripts
FP8_DTYPE = torch.float8_e4m3fn
_FP8_SKIPPED_MODULES = ("norm", "embeddings")  # kept in the working precision, as sd-scripts keeps the embeddings


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Compile, fp8, DDP, DeepSpeed and memory-hint flags, spelled as in sd-scripts."""
    parser.add_argument("--torch_compile", action="store_true", help="compile the UNet with torch.compile")
    parser.add_argument(
        "--dynamo_backend",
        type=str,
        default="inductor",
        choices=DYNAMO_BACKENDS,
        help="torch.compile backend for --torch_compile (default inductor; eager/aot_eager compile fastest)",
    )
    parser.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the frozen base model (UNet and text encoder) in float8; needs --mixed_precision fp16/bf16",
    )
    parser.add_argument(
        "--fp8_base_unet", action="store_true", help="store only the frozen UNet in float8 (text encoder stays)"
    )
    parser.add_argument(
        "--ddp_timeout",
        type=DDP_TIMEOUT_MINUTES.argtype(),
        default=None,
        help="process-group timeout in minutes for multi-process runs (unset or 0: torch's default)",
    )
    parser.add_argument(
        "--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view (accelerate)"
    )
    parser.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph (accelerate)")
    parser.add_argument(
        "--highvram", action="store_true", help="skip memory clean-ups meant for small GPUs (sd-scripts' flag)"
    )
    parser.add_argument(
        "--cpu_offload_checkpointing",
        action="store_true",
        help="FLUX/SD3 only in sd-scripts: offload checkpointed activations to the CPU (no effect on SD1/2)",
    )
    add_deepspeed_arguments(parser)


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed ZeRO settings (need the deepspeed package and CUDA)."""
    parser.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed ZeRO (pip install deepspeed)")
    parser.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument(
        "--offload_optimizer_device",
        type=str,
        default=None,
        choices=[None, "cpu", "nvme"],
        help="offload optimizer state (ZeRO 2 and 3)",
    )
    parser.add_argument("--offload_optimizer_nvme_path", type=str, default=None, help="NVMe path (ZeRO 3)")
    parser.add_argument(
        "--offload_param_device",
        type=str,
        default=None,
        choices=[None, "cpu", "nvme"],
        help="offload parameters (ZeRO 3)",
    )
    parser.add_argument("--offload_param_nvme_path", type=str, default=None, help="NVMe path (ZeRO 3)")
    parser.add_argument("--zero3_init_flag", action="store_true", help="deepspeed.zero.Init for models (ZeRO 3)")
    parser.add_argument("--zero3_save_16bit_model", action="store_true", help="save 16-bit weights (ZeRO 3)")
    parser.add_argument(
        "--fp16_master_weights_and_gradients",
        action="store_true",
        help="fp16 master weights and gradients (DeepSpeed ZeRO 2 with --offload_optimizer_device cpu only)",
    )


@dataclass(frozen=True)
class DistributedSettings:
    """How processes are joined (--ddp_*) and how DeepSpeed shards the run (--deepspeed, --zero_stage, --offload_*,
    --zero3_*), under the flags' names; the engine's config holds the one copy."""

    ddp_timeout: int | None = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    deepspeed: bool = False
    zero_stage: int = 2
    offload_optimizer_device: str | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_device: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool = False
    zero3_save_16bit_model: bool = False
    fp16_master_weights_and_gradients: bool = False


@dataclass(frozen=True)
class RuntimeSettings:
    """The compile, fp8 and memory flags of :func:`add_runtime_arguments` (and ``--mixed_precision``)."""

    mixed_precision: str = "no"
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    fp8_base: bool = False
    fp8_base_unet: bool = False
    highvram: bool = False
    cpu_offload_checkpointing: bool = False


class DeepSpeedLoop(Protocol):
    """What a DeepSpeed plugin takes from the loop's settings besides :class:`DistributedSettings`."""

    distributed: DistributedSettings
    train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    mixed_precision: str
    full_fp16: bool


def compile_options(settings: RuntimeSettings) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for --torch_compile (None without it).

    The backend is --dynamo_backend; mode, fullgraph and dynamic come from accelerate's ``TorchDynamoPlugin``, so
    ``accelerate launch --dynamo_mode/--dynamo_use_fullgraph/--dynamo_use_dynamic`` apply as they do in sd-scripts.
    """
    if not settings.torch_compile:
        return None
    from accelerate.utils import TorchDynamoPlugin

    backend = settings.dynamo_backend
    if backend == "no":
        raise UserError("--torch_compile with --dynamo_backend no compiles nothing: choose a backend (e.g. inductor)")
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise UserError(
            f"--dynamo_backend {backend}: not available in this PyTorch; use one of "
            f"{', '.join(b for b in DYNAMO_BACKENDS if b in available)}, or drop --torch_compile"
        )
    plugin = TorchDynamoPlugin(backend=backend)
    return {"backend": backend, "mode": plugin.mode, "fullgraph": plugin.fullgraph, "dynamic": plugin.dynamic}


def compile_unet(unet: nn.Module, settings: RuntimeSettings) -> dict[str, Any] | None:
    """--torch_compile: compile ``unet`` in place (``nn.Module.compile``), so state dicts, LoRA hooks and saving see
    the same module; returns the options used (None without the flag). Compilation happens at the first forward."""
    options = compile_options(settings)
    if options is None:
        return None
    unet.compile(**options)
    logger.info(f"--torch_compile: the UNet is compiled with the {options['backend']} backend at its first step")
    return options


def process_group_kwargs(ddp_timeout: int | None) -> dict[str, Any]:
    """``torch.distributed.init_process_group`` keyword arguments from --ddp_timeout (minutes; unset or 0: none)."""
    return {} if not ddp_timeout else {"timeout": datetime.timedelta(minutes=ddp_timeout)}


def accelerate_kwargs_handlers(settings: DistributedSettings) -> list[Any]:
    """accelerate's ``InitProcessGroupKwargs`` (--ddp_timeout) and ``DistributedDataParallelKwargs``
    (--ddp_gradient_as_bucket_view, --ddp_static_graph), each only when its flags are given (as sd-scripts)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list[Any] = []
    group = process_group_kwargs(settings.ddp_timeout)
    if group:
        handlers.append(InitProcessGroupKwargs(timeout=group["timeout"]))
    bucket_view = settings.ddp_gradient_as_bucket_view
    static_graph = settings.ddp_static_graph
    if bucket_view or static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=bucket_view, static_graph=static_graph))
    return handlers


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_plugin(loop: DeepSpeedLoop, world_size: int):
    """accelerate's ``DeepSpeedPlugin`` built from the flags as sd-scripts' ``deepspeed_utils`` builds it (None
    without --deepspeed): batch sizes for ``world_size`` processes, the mixed precision, fp16 loss scale from 2**0,
    and fp16 master weights only where DeepSpeed supports them (ZeRO 2 with CPU optimizer offload)."""
    settings = loop.distributed
    if not settings.deepspeed:
        return None
    from accelerate import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=settings.zero_stage,
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        gradient_clipping=loop.max_grad_norm,
        offload_optimizer_device=settings.offload_optimizer_device,
        offload_optimizer_nvme_path=settings.offload_optimizer_nvme_path,
        offload_param_device=settings.offload_param_device,
        offload_param_nvme_path=settings.offload_param_nvme_path,
        zero3_init_flag=settings.zero3_init_flag,
        zero3_save_16bit_model=settings.zero3_save_16bit_model,
    )
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = loop.train_batch_size
    config["train_batch_size"] = loop.train_batch_size * loop.gradient_accumulation_steps * world_size
    plugin.set_mixed_precision(loop.mixed_precision)
    if loop.mixed_precision == "fp16":
        config["fp16"]["initial_scale_power"] = 0
    if loop.full_fp16 or settings.fp16_master_weights_and_gradients:
        if settings.offload_optimizer_device == "cpu" and settings.zero_stage == 2:
            config["fp16"]["fp16_master_weights_and_grads"] = True
        else:
            logger.warning(
                "--fp16_master_weights_and_gradients / --full_fp16: DeepSpeed supports fp16 master weights only with "
                "--zero_stage 2 and --offload_optimizer_device cpu; not enabled"
            )
    return plugin


def check_deepspeed(settings: DistributedSettings) -> None:
    """--deepspeed needs the deepspeed package; say so in one line instead of failing inside accelerate."""
    if settings.deepspeed and not deepspeed_installed():
        raise UserError(
            "--deepspeed needs the deepspeed package, which is not installed: pip install deepspeed "
            "(it needs CUDA), or drop --deepspeed"
        )


def check_fp8(settings: RuntimeSettings) -> None:
    """sd-scripts' rule: fp8 base weights need mixed precision (the layers compute in fp16/bf16)."""
    if (settings.fp8_base or settings.fp8_base_unet) and settings.mixed_precision == "no":
        flag = "--fp8_base" if settings.fp8_base else "--fp8_base_unet"
        raise UserError(f"{flag} needs --mixed_precision fp16 or bf16 (fp8 weights are computed in that precision)")


def store_in_fp8(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep ``module``'s Linear/Conv weights in float8_e4m3fn, cast to ``compute_dtype`` layer by layer while it runs
    (diffusers' layerwise casting); norms and embeddings stay in ``compute_dtype``. The module then reports
    ``compute_dtype`` as its dtype, so the trainer does not cast it back."""
    from diffusers.hooks import apply_layerwise_casting

    module.to(dtype=compute_dtype)
    apply_layerwise_casting(
        module, storage_dtype=FP8_DTYPE, compute_dtype=compute_dtype, skip_modules_pattern=_FP8_SKIPPED_MODULES
    )


def apply_fp8_base(settings: RuntimeSettings, unet: nn.Module, text_encoders: Sequence[nn.Module]) -> list[str]:
    """--fp8_base (UNet and text encoders) / --fp8_base_unet (UNet only): store the frozen base weights in fp8.

    ``text_encoders`` is empty where they must keep full precision (textual inversion trains through the
    embedding). Returns the names of the models now stored in fp8."""
    check_fp8(settings)
    if not (settings.fp8_base or settings.fp8_base_unet):
        return []
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}[settings.mixed_precision]
    store_in_fp8(unet, compute)
    stored = ["UNet"]
    if text_encoders and settings.fp8_base and not settings.fp8_base_unet:
        for encoder in text_encoders:
            store_in_fp8(encoder, compute)
        stored.append("text encoder" if len(text_encoders) == 1 else "text encoders")
    logger.info(f"fp8 base: {' and '.join(stored)} weights stored in float8_e4m3fn, computed in {compute}")
    return stored


def runtime_notes(settings: RuntimeSettings, distributed: DistributedSettings, num_processes: int) -> list[str]:
    """One line for each given flag that does nothing in this run, and why (logged at start-up)."""
    notes = []
    if settings.highvram:
        notes.append(
            "--highvram has no effect: this trainer never clears the CUDA cache or collects garbage during latent "
            "caching, which is the clean-up --highvram skips in sd-scripts"
        )
    if settings.cpu_offload_checkpointing:
        notes.append("--cpu_offload_checkpointing applies to FLUX/SD3 only in sd-scripts; it has no effect on SD1/2")
    ddp = [f for f in ("ddp_gradient_as_bucket_view", "ddp_static_graph") if getattr(distributed, f)]
    if ddp and num_processes > 1:
        notes.append(
            f"--{' and --'.join(ddp)}: passed to accelerate's DDP wrapper, but this trainer averages gradients "
            "itself (one all-reduce per trained tensor), so DDP's buckets and graph options do not change training"
        )
    elif ddp:
        notes.append(f"--{' and --'.join(ddp)} has no effect in a one-process run")
    if distributed.ddp_timeout and num_processes == 1:
        notes.append("--ddp_timeout has no effect in a one-process run")
    if not distributed.deepspeed and _deepspeed_settings_given(distributed):
        notes.append("DeepSpeed settings (--zero_stage, --offload_*, --zero3_*) have no effect without --deepspeed")
    return notes


def _deepspeed_settings_given(settings: DistributedSettings) -> bool:
    paths = (settings.offload_optimizer_nvme_path, settings.offload_param_nvme_path)
    devices = (settings.offload_optimizer_device, settings.offload_param_device)
    flags = (settings.zero3_init_flag, settings.zero3_save_16bit_model, settings.fp16_master_weights_and_gradients)
    return any(v is not None for v in (*devices, *paths)) or any(flags)
