"""sd-scripts' 23 UNet blocks of ``--block_lr`` (sdxl_train.py), found from diffusers parameter names.

sd-scripts numbers the parameters of its SGM-layout SDXL UNet: 0 time and label embeddings, 1-9 ``input_blocks``
0-8, 10-12 ``middle_block`` 0-2, 13-21 ``output_blocks`` 0-8, 22 ``out``. A diffusers UNet holds the same layers
under other names, which ``SgmNames`` maps; a smaller UNet (the tiny test model) leaves some slots empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from library.models.sgm_names import SgmNames

BLOCK_COUNT = 23
_FIRST_SLOT = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def block_index(name: str, names: SgmNames) -> int:
    """The ``--block_lr`` block (0-22) of the diffusers UNet parameter ``name``, by its SGM module path."""
    if name.startswith(("time_embedding.", "add_embedding.")):
        return 0
    if name.startswith("conv_in."):
        return 1  # input_blocks.0
    if name.startswith(("conv_norm_out.", "conv_out.")):
        return 22
    module = names.to_sgm(name.rpartition(".")[0]).split(".")
    if module[0] in _FIRST_SLOT:
        return _FIRST_SLOT[module[0]] + int(module[1])
    raise ValueError(f"--block_lr: the UNet parameter {name} belongs to no SDXL block")


def block_param_groups(unet: nn.Module, rates: Sequence[float]) -> tuple[list[dict[str, Any]], list[str]]:
    """Optimizer groups ``block<i>`` of the UNet's parameters at ``rates[i]``; blocks at rate 0 are left out and
    frozen, as in sd-scripts."""
    names = SgmNames(unet.config)
    blocks: list[list[torch.nn.Parameter]] = [[] for _ in range(BLOCK_COUNT)]
    for name, param in unet.named_parameters():
        blocks[block_index(name, names)].append(param)
    groups, names = [], []
    for i, (params, rate) in enumerate(zip(blocks, rates)):
        if rate == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        if params:
            groups.append({"params": params, "lr": rate})
            names.append(f"block{i}")
    return groups, names
