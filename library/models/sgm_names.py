"""sd-scripts' SDXL UNet module names (SGM layout: ``input_blocks.4.1…``) for a diffusers SDXL UNet.

sd-scripts trains SDXL LoRA on its own SGM-layout UNet, so its ``lora_unet_…`` keys follow SGM module paths while
ours are trained on diffusers' UNet2DConditionModel. The table is computed from the UNet's config (block types,
layers per block), so the tiny test UNet and SDXL base are named by the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from library.errors import UserError

# ResnetBlock2D children: diffusers name → SGM name (sdxl_original_unet.ResnetBlock2D's Sequential indices)
RESNET_CHILDREN = (
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
SDXL_MID_SLOTS = 3  # sd-scripts' block-wise scheme: middle_block 0, 1, 2


def is_sdxl_unet(unet) -> bool:
    """Whether a diffusers UNet is SDXL-shaped: its added conditioning is text embeddings plus size/crop times."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def _per_block(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * n


class SgmNames:
    """The block table of one UNet config: diffusers block paths ↔ SGM block paths, and their child names.

    ``to_sgm("down_blocks.1.attentions.0.proj_in") == "input_blocks.4.1.proj_in"`` for SDXL base. Modules outside
    the blocks (conv_in, time and added embeddings, conv_out) keep their names.
    """

    def __init__(self, config) -> None:
        down, up = tuple(config.down_block_types), tuple(config.up_block_types)
        if getattr(config, "mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise UserError(f"UNet mid block {config.mid_block_type}: SGM (SDXL) LoRA names need a cross-attention mid")
        layers = _per_block(config.layers_per_block, len(down))
        blocks: dict[str, str] = {}
        index = 1  # input_blocks.0 is conv_in
        for i, kind in enumerate(down):
            for j in range(layers[i]):
                blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
                if "CrossAttn" in kind:
                    blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
                index += 1
            if i < len(down) - 1:
                blocks[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{index}.0"
                index += 1
        self.n_input = index
        blocks["mid_block.resnets.0"] = "middle_block.0"
        blocks["mid_block.attentions.0"] = "middle_block.1"
        blocks["mid_block.resnets.1"] = "middle_block.2"
        index = 0
        for i, (kind, n) in enumerate(zip(up, reversed(layers))):
            attn = "CrossAttn" in kind
            for j in range(n + 1):
                blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
                if attn:
                    blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
                if j == n and i < len(up) - 1:  # SGM appends the upsampler after the last layer's modules
                    blocks[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index}.{2 if attn else 1}"
                index += 1
        self.n_output = index
        self.blocks = blocks

    @staticmethod
    def _child_to_sgm(block: str, child: str) -> str:
        head, _, rest = child.partition(".")
        if ".resnets." in block:
            for name, sgm in RESNET_CHILDREN:
                if head == name:
                    return sgm + (f".{rest}" if rest else "")
        if ".downsamplers." in block and head == "conv":
            return "op" + (f".{rest}" if rest else "")
        return child

    def to_sgm(self, path: str) -> str:
        """SGM module path of a diffusers UNet module path (unchanged outside the blocks)."""
        parts = path.split(".")
        width = 3 if parts[0] == "mid_block" else 4
        block = ".".join(parts[:width])
        if parts[0] not in ("down_blocks", "mid_block", "up_blocks") or block not in self.blocks:
            return path
        child = ".".join(parts[width:])
        sgm = self.blocks[block]
        return f"{sgm}.{self._child_to_sgm(block, child)}" if child else sgm

    def block_count(self) -> int:
        """Slots of sd-scripts' SDXL block-wise scheme: base, input blocks, 3 mid, output blocks, out (SDXL: 23)."""
        return 1 + self.n_input + SDXL_MID_SLOTS + self.n_output + 1

    def block_index(self, lora_name: str) -> int:
        """sd-scripts' SDXL block index of a ``lora_unet_…`` name (input_blocks.N → 1 + N, …); -1 when none."""
        name = lora_name.removeprefix("lora_unet_")
        parts = name.split("_")
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        if name.startswith("input_blocks_"):
            return 1 + int(parts[2])
        if name.startswith("middle_block_"):
            return 1 + self.n_input + int(parts[2])
        if name.startswith("output_blocks_"):
            return 1 + self.n_input + SDXL_MID_SLOTS + int(parts[2])
        if name.startswith("out_"):
            return self.block_count() - 1
        return -1
