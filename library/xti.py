"""XTI (P+): a different text conditioning for each of SD1's 16 UNet cross-attention layers.

The per-layer conditionings are concatenated along the sequence axis, ``(B, 16 * L, width)``, and passed to the
UNet as one tensor; each cross-attention layer gets an attention processor that keeps only its own ``L`` positions.
The layers, in sd-scripts' order (``IN01`` … ``OUT11``), are the down blocks' attentions, the mid block's, then
the up blocks'. No UNet code is patched, so the same UNet still runs normally once the processors are removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from library.errors import UserError
from library.textual_inversion import XTI_LAYERS

_GROUP = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)\.")
_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


class LayerSlice:
    """An attention processor that hands its cross-attention layer slice ``index`` of ``count`` equal parts of the
    stacked conditioning, then runs the layer's own processor."""

    def __init__(self, index: int, count: int, inner: Any):
        self.index = index
        self.count = count
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            if encoder_hidden_states.shape[1] % self.count:
                raise ValueError(
                    f"XTI conditioning has {encoder_hidden_states.shape[1]} positions, not a multiple of {self.count}"
                )
            encoder_hidden_states = encoder_hidden_states.chunk(self.count, dim=1)[self.index]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def cross_attention_layers(unet: torch.nn.Module) -> list[list[str]]:
    """The UNet's cross-attention processor names grouped by transformer (one group per XTI layer), in order."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        match = _GROUP.match(name)
        if match is None:
            raise UserError(f"XTI: unexpected cross-attention layer {name}; XTI supports SD 1.x UNets only")
        part, block, attention = match.groups()
        groups.setdefault((_ORDER[part], int(block or 0), int(attention)), []).append(name)
    return [groups[key] for key in sorted(groups)]


def install_layer_conditioning(unet: Any) -> None:
    """Give each of the UNet's 16 cross-attention layers its own slice of a stacked XTI conditioning."""
    layers = cross_attention_layers(unet)
    if len(layers) != len(XTI_LAYERS):
        raise UserError(
            f"XTI needs SD 1.x's 16 cross-attention layers, this UNet has {len(layers)}; use train_textual_inversion.py"
        )
    processors = dict(unet.attn_processors)
    for index, names in enumerate(layers):
        for name in names:
            processors[name] = LayerSlice(index, len(layers), processors[name])
    unet.set_attn_processor(processors)


def layer_conditioning(
    encode: Callable[[list[str]], torch.Tensor], captions: list[str], layer_captions: Callable[[str, str], str]
) -> torch.Tensor:
    """Encode each caption once per XTI layer (``layer_captions(caption, layer)``) and stack along the sequence."""
    return torch.cat([encode([layer_captions(c, layer) for c in captions]) for layer in XTI_LAYERS], dim=1)
