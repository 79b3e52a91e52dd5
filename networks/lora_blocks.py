"""sd-scripts' block-wise scheme for LoRA network args: block indices, per-block dims and lr weights.

SD 1.x/2.x: 12 down, 1 mid, 12 up slots (derived from the UNet's structure). SDXL (SGM names): 1 base, 9 input,
3 mid, 9 output, 1 out = 23 slots, as sd-scripts' networks/lora.py numbers them for SDXL.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from library.errors import UserError
from library.models.sgm_names import SDXL_MID_SLOTS, SgmNames, is_sdxl_unet

logger = logging.getLogger(__name__)

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


BlockLayout = tuple[int, int] | SgmNames


def unet_block_layout(unet: torch.nn.Module) -> BlockLayout:
    """sd-scripts' block scheme of a UNet: SDXL's SGM table, else (down slots, layers per block + 1) (SD1: (12, 3))."""
    if is_sdxl_unet(unet):
        return SgmNames(unet.config)
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise UserError(
            f"block-wise network args need a UNet with one layers_per_block for every block, got {layers}; "
            "drop block_dims/block_alphas/*_lr_weight from --network_args"
        )
    stride = layers + 1
    return len(unet.config.down_block_types) * stride, stride


def block_slots(layout: BlockLayout) -> tuple[int, int, int, int, int]:
    """Slot counts (before, down, mid, up, after) of a block scheme; their sum is the block_dims length."""
    if isinstance(layout, SgmNames):
        return 1, layout.n_input, SDXL_MID_SLOTS, layout.n_output, 1
    return 0, layout[0], 1, layout[0], 0


def get_block_index(lora_name: str, layout: BlockLayout = (12, 3)) -> int:
    """sd-scripts' block index of a UNet LoRA (down 1..n, mid n, up n+1..2n); -1 when the name has no block."""
    if isinstance(layout, SgmNames):
        return layout.block_index(lora_name)
    n_down, stride = layout
    m = RE_UPDOWN.search(lora_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = stride * i + (stride - 1 if part in ("upsamplers", "downsamplers") else j)
        return 1 + idx if kind == "down" else n_down + 1 + idx
    if "mid_block_" in lora_name:
        return n_down
    return -1


def parse_number(kwargs: dict, key: str, kind: type):
    """One numeric network arg (``None``/``none``/empty mean unset)."""
    value = kwargs.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value}: not a valid {kind.__name__}; write e.g. {key}=4") from None


def parse_number_list(kwargs: dict, key: str, kind: type, length: int) -> list | None:
    """One per-block network arg (``block_dims`` …): exactly ``length`` comma-separated numbers, or None."""
    value = kwargs.get(key)
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        parsed = [kind(str(s).strip()) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value}: expected {length} comma-separated numbers") from None
    if len(parsed) != length:
        raise UserError(
            f"--network_args {key}: {len(parsed)} values given, this UNet has {length} blocks "
            f"(down, mid, up in sd-scripts' order); give {length} comma-separated values"
        )
    return parsed


def lr_weight_list(kwargs: dict, key: str, length: int) -> list[float] | None:
    """A per-block lr weight list: numbers (missing entries 0, short lists padded with 1) or a preset name."""
    value = kwargs.get(key)
    if value is None:
        return None
    text = str(value).strip()
    name, _, base = text.partition("+")
    if name in LR_WEIGHT_PRESETS:
        base_lr = float(base) if base else 0.0
        steps = [i / (length - 1) for i in range(length)] if length > 1 else [0.0]
        curves = {
            "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
            "sine": [math.sin(math.pi * s / 2) for s in steps],
            "linear": list(steps),
            "reverse_linear": list(reversed(steps)),
            "zeros": [0.0] * length,
        }
        return [w + base_lr for w in curves[name]]
    try:
        weights = [float(s) if s.strip() else 0.0 for s in text.split(",")]
    except ValueError:
        raise UserError(
            f"--network_args {key}={value}: give comma-separated numbers or one of {', '.join(LR_WEIGHT_PRESETS)}"
        ) from None
    if len(weights) > length:
        logger.warning(f"{key} has {len(weights)} values; values after the {length}th are ignored")
    return (weights + [1.0] * length)[:length]


def parse_block_lr_weight(kwargs: dict, layout: BlockLayout) -> list[float] | None:
    """sd-scripts' down/mid/up lr weights as one list over all block indices, or None when none is given.

    SDXL's first and last slots (time/label embedding, out) are not weighted by any arg and stay 1.
    """
    before, n_down, n_mid, n_up, after = block_slots(layout)
    down = lr_weight_list(kwargs, "down_lr_weight", n_down)
    mid = lr_weight_list(kwargs, "mid_lr_weight", n_mid)
    up = lr_weight_list(kwargs, "up_lr_weight", n_up)
    if down is None and mid is None and up is None:
        return None
    threshold = parse_number(kwargs, "block_lr_zero_threshold", float) or 0.0
    weights = (down or [1.0] * n_down) + (mid or [1.0] * n_mid) + (up or [1.0] * n_up)
    return [1.0] * before + [w if w > threshold else 0.0 for w in weights] + [1.0] * after
