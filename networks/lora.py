"""sd-scripts' LoRA network (``--network_module networks.lora``) for SD 1.x/2.x and SDXL models of any width, plus
LyCORIS's algos natively (``--network_args algo=locon|loha|lokr|full dora_wd=true``).

Same module interface, key names, scale rule (alpha / dim), initialisation, dropouts, block-wise dims and learning
rates, LoRA+ groups and file layout as kohya sd-scripts, so files and habits move between the two unchanged; LoHa,
LoKr, full and DoRA modules write LyCORIS's keys and follow its math (networks/adapters.py). SDXL UNet modules are
named after sd-scripts' SGM-layout UNet (``lora_unet_input_blocks_…``) and two text encoders are
``lora_te1``/``lora_te2``; block indices follow sd-scripts' schemes (lora_blocks.py); target layers come from
``preset=`` (networks/presets.py).
"""

from __future__ import annotations

import logging

import torch

from library.errors import UserError
from networks.lora_blocks import (
    LR_WEIGHT_KEYS,
    block_slots,
    parse_block_lr_weight,
    parse_number,
    parse_number_list,
    unet_block_layout,
)
from networks.lora_modules import (
    LoRAModule,
    delta_weight,
    load_lora_state_dict,
    module_tensors,
    normalize_lora_key,
    normalize_state_dict,
    text_encoder_module_path,
)
from networks.lora_network import LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_UNET, LoRANetwork, layout_of
from networks.presets import SD_TE, SD_UNET_ATTN, SD_UNET_CONV, resolve_preset

__all__ = [
    "LORA_PREFIX_TEXT_ENCODER",
    "LORA_PREFIX_UNET",
    "LoRAModule",
    "LoRANetwork",
    "create_network",
    "create_network_from_weights",
    "delta_weight",
    "load_lora_state_dict",
    "normalize_lora_key",
    "normalize_state_dict",
    "text_encoder_module_path",
]

logger = logging.getLogger(__name__)

UNET_TARGET_REPLACE_MODULE = SD_UNET_ATTN
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = SD_UNET_CONV
TEXT_ENCODER_TARGET_REPLACE_MODULE = SD_TE
ALGOS = ("lora", "locon", "loha", "lokr", "full")
LOKR_ARGS = ("factor", "decompose_both", "full_matrix")
KNOWN_NETWORK_ARGS = frozenset(
    "conv_dim conv_alpha block_dims block_alphas conv_block_dims conv_block_alphas block_lr_zero_threshold "
    "rank_dropout module_dropout loraplus_lr_ratio loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio "
    "algo dora_wd wd_on_output use_tucker rank_dropout_scale preset dropout".split()
).union(LR_WEIGHT_KEYS, LOKR_ARGS)


def parse_bool(kwargs: dict, key: str, default: bool = False) -> bool:
    """A true/false network arg (``true``/``false``/``1``/``0``/``yes``/``no``)."""
    value = kwargs.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none"):
        return False
    raise UserError(f"--network_args {key}={value}: give true or false")


def adapter_options(kwargs: dict, algo: str) -> dict:
    """LyCORIS's per-module options from the network args, checked against the algo."""
    options = {
        "weight_decompose": parse_bool(kwargs, "dora_wd"),
        "wd_on_out": parse_bool(kwargs, "wd_on_output", True),
        "rank_dropout_scale": parse_bool(kwargs, "rank_dropout_scale"),
    }
    if options["weight_decompose"] and algo == "full":
        raise UserError("--network_args dora_wd=true: DoRA is for algo=lora/locon/loha/lokr, not full; drop dora_wd")
    if algo != "full":
        options["use_tucker"] = parse_bool(kwargs, "use_tucker")
    if algo == "lokr":
        options["factor"] = parse_number(kwargs, "factor", int) or -1
        options["decompose_both"] = parse_bool(kwargs, "decompose_both")
        options["full_matrix"] = parse_bool(kwargs, "full_matrix")
    else:
        for key in LOKR_ARGS:
            if kwargs.get(key) is not None:
                logger.warning(f"--network_args {key}: only used by algo=lokr; ignored for algo={algo}")
    return options


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """Build a network from sd-scripts' flags; ``kwargs`` are the ``--network_args`` (strings are parsed)."""
    for key in kwargs:
        if key not in KNOWN_NETWORK_ARGS:
            logger.warning(
                f"--network_args {key}: not used by networks.lora (known: {', '.join(sorted(KNOWN_NETWORK_ARGS))})"
            )
    algo = str(kwargs.get("algo") or "lora").strip().lower()
    if algo not in ALGOS:
        raise UserError(f"--network_args algo={algo}: unknown; networks.lora trains {', '.join(ALGOS)}")
    options = adapter_options(kwargs, algo)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = parse_number(kwargs, "conv_dim", int)
    conv_alpha = parse_number(kwargs, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    preset = resolve_preset(kwargs.get("preset"), conv_dim is not None)
    if preset.enable_conv is False:
        conv_dim = conv_alpha = None
    elif preset.enable_conv and conv_dim is None:  # LyCORIS: conv layers take the network's dim and alpha
        conv_dim, conv_alpha = network_dim, network_alpha
    if neuron_dropout is None:
        neuron_dropout = parse_number(kwargs, "dropout", float)
    block_wise = any(kwargs.get(k) is not None for k in ("block_dims",) + LR_WEIGHT_KEYS)
    block_dims = block_alphas = conv_block_dims = conv_block_alphas = block_lr_weight = None
    if block_wise:
        layout = unet_block_layout(unet)
        n = sum(block_slots(layout))
        block_lr_weight = parse_block_lr_weight(kwargs, layout)
        block_dims = parse_number_list(kwargs, "block_dims", int, n) or [network_dim] * n
        block_alphas = parse_number_list(kwargs, "block_alphas", float, n) or [network_alpha] * n
        conv_block_dims = parse_number_list(kwargs, "conv_block_dims", int, n)
        if conv_block_dims is not None:
            conv_block_alphas = parse_number_list(kwargs, "conv_block_alphas", float, n) or [conv_alpha or 1.0] * n
        elif conv_dim is not None:
            conv_block_dims, conv_block_alphas = [conv_dim] * n, [conv_alpha] * n
        if block_lr_weight is not None:
            for i, w in enumerate(block_lr_weight):
                if w == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim,
        alpha=network_alpha,
        dropout=neuron_dropout,
        rank_dropout=parse_number(kwargs, "rank_dropout", float),
        module_dropout=parse_number(kwargs, "module_dropout", float),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        block_dims=block_dims,
        block_alphas=block_alphas,
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
        algo=algo,
        adapter_kwargs=options,
        preset=preset,
    )
    set_loraplus(network, kwargs, algo)
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    return network


def set_loraplus(network: LoRANetwork, kwargs: dict, algo: str) -> None:
    """LoRA+ ratios from the network args; refused for algos without an up matrix (LoHa, LoKr, full)."""
    ratios = [parse_number(kwargs, f"loraplus_{k}lr_ratio", float) for k in ("", "unet_", "text_encoder_")]
    if all(r is None for r in ratios):
        return
    if algo not in ("lora", "locon"):
        raise UserError(f"--network_args loraplus_*: LoRA+ needs an up matrix, which algo={algo} has not; drop it")
    network.set_loraplus_lr_ratio(*ratios)


def create_network_from_weights(
    multiplier: float, file, vae, text_encoder, unet, weights_sd=None, for_inference: bool = False, **kwargs
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """The network a file describes, module by module (LoRA, LoCon/DoRA, LoHa, LoKr, full, read from its keys;
    alpha defaults to dim for old LoRA files).

    Weights are not loaded (call ``load_weights`` or ``merge_to``); returns the network and the file's tensors.
    """
    weights_sd = normalize_state_dict(load_lora_state_dict(file) if weights_sd is None else weights_sd)
    modules_sd = {name: sd for name, sd in module_tensors(weights_sd).items() if layout_of(sd) != "unknown"}
    if not modules_sd:
        raise UserError(
            f"{file}: no LoRA, LoHa, LoKr or full module keys found; this is not a network file networks.lora reads"
        )
    kinds = [layout_of(sd) for sd in modules_sd.values()]
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, algo=max(set(kinds), key=kinds.count), modules_sd=modules_sd
    )
    if unet is not None and any(kwargs.get(k) is not None for k in LR_WEIGHT_KEYS):
        network.block_layout = unet_block_layout(unet)
        network.set_block_lr_weight(parse_block_lr_weight(kwargs, network.block_layout))
    set_loraplus(network, kwargs, "lora" if network.algo in ("lora", "locon") else network.algo)
    return network, weights_sd


def network_with_algo(
    algo: str, multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, kwargs: dict
) -> LoRANetwork:
    """``create_network`` of a module that stands for one algo (networks.loha, networks.lokr)."""
    given = str(kwargs.get("algo") or algo).strip().lower()
    if given != algo:
        raise UserError(f"--network_args algo={given}: networks.{algo} trains algo={algo}; drop algo={given}")
    return create_network(
        multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, **{**kwargs, "algo": algo}
    )
