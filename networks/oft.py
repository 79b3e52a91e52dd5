"""sd-scripts' OFT (``--network_module networks.oft``): orthogonal finetuning of the UNet, block-diagonal rotations
of each target layer's output rows, saved as sd-scripts saves them (``oft_unet_….oft_blocks`` + ``alpha``).

``--network_dim`` is the number of blocks per layer and ``--network_alpha`` the constraint: the skew-symmetric
``Q = B - Bᵀ`` is clipped to norm ``alpha * out_dim``, ``R = (I + Q)(I - Q)⁻¹`` (Cayley), weighted as
``multiplier * (R - I) + I``, and the layer runs with ``W' = Rᵀ W`` per block, exactly as sd-scripts' forward.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.models.sgm_names import SgmNames, is_sdxl_unet
from networks.lora_modules import load_lora_state_dict
from networks.network_base import HookedLayer, NetworkBase

logger = logging.getLogger(__name__)

OFT_PREFIX_UNET = "oft_unet"
# sd-scripts' own UNet calls its attention class CrossAttention; diffusers' UNet calls it Attention
UNET_TARGETS_ATTN_ONLY = ("CrossAttention", "Attention")
UNET_TARGETS_ALL_LINEAR = ("Transformer2DModel",)
UNET_TARGETS_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KNOWN_NETWORK_ARGS = frozenset(("enable_all_linear", "enable_conv"))
DEFAULT_ALPHA = 1e-3


class OFTModule(HookedLayer):
    """OFT on one Linear or Conv2d: ``oft_blocks`` (blocks x block size x block size, zeros = identity) rotate the
    base weight's output rows block by block; the base layer's forward is replaced while applied."""

    def __init__(
        self, oft_name: str, org_module: nn.Module, multiplier: float = 1.0, dim: int = 4, alpha: float = DEFAULT_ALPHA
    ) -> None:
        super().__init__()
        self.oft_name = oft_name
        self.num_blocks = int(dim)
        out_dim = org_module.out_channels if isinstance(org_module, nn.Conv2d) else org_module.out_features
        if self.num_blocks < 1 or out_dim % self.num_blocks:
            raise UserError(
                f"OFT {oft_name}: {out_dim} output features cannot be split into --network_dim {dim} blocks; "
                "give a number of blocks that divides every target layer's width (e.g. 4 or 8)"
            )
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        self.out_dim = out_dim
        self.constraint = alpha * out_dim  # sd-scripts' constraint: alpha * out_dim (the paper's alpha * out_dim²)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.block_size = out_dim // self.num_blocks
        self.oft_blocks = nn.Parameter(torch.zeros(self.num_blocks, self.block_size, self.block_size))
        eye = torch.eye(self.block_size).unsqueeze(0).repeat(self.num_blocks, 1, 1)
        self.register_buffer("eye", eye, persistent=False)
        self.multiplier = multiplier
        self._org = [org_module]  # a plain list keeps the base layer out of this module's state dict
        self._org_forward = None

    def get_weight(self) -> torch.Tensor:
        """The weighted rotations ``multiplier * (R - I) + I``, one ``block_size`` square per block."""
        block_q = self.oft_blocks - self.oft_blocks.transpose(1, 2)
        norm_q = torch.norm(block_q.flatten())
        new_norm_q = torch.clamp(norm_q, max=self.constraint)
        block_q = block_q * ((new_norm_q + 1e-8) / (norm_q + 1e-8))
        eye = self.eye.to(block_q.device, torch.float32)  # float32 as sd-scripts' I, whatever the blocks' dtype
        block_r = torch.matmul(eye + block_q, (eye - block_q).float().inverse())
        return self.multiplier * (block_r - eye) + eye

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``Rᵀ W`` per block of output rows, in float32."""
        r = self.get_weight().to(torch.float32)
        w = weight.to(torch.float32)
        blocks = w.reshape(self.num_blocks, self.block_size, -1)
        return torch.einsum("k n m, k n p -> k m p", r, blocks).reshape(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer run with the rotated weight (its own forward when the multiplier is 0)."""
        if self.multiplier == 0.0:
            return self._org_forward(x)
        org = self.org_module
        rw = self.rotated_weight(org.weight).to(x.dtype)
        if isinstance(org, nn.Conv2d):
            return F.conv2d(x, rw, org.bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, rw, org.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        """Load as usual, then take the constraint from the loaded alpha so a file trains and runs as it was saved."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "alpha" in state_dict:
            self.constraint = float(self.alpha) * self.out_dim

    @torch.no_grad()
    def merge_to(self, dtype: torch.dtype | None = None, device=None) -> None:
        """Rotate the base layer's weight in place (times the multiplier), as sd-scripts' merge."""
        weight = self.org_module.weight
        merged = self.rotated_weight(weight.detach().to(device or weight.device))
        weight.copy_(merged.to(dtype or weight.dtype))


def target_layers(unet: nn.Module, enable_all_linear: bool, enable_conv: bool) -> Iterator[tuple[str, nn.Module]]:
    """``(oft name, layer)`` of sd-scripts' OFT targets: Linear and 1x1 convs of the attention (or, with
    enable_all_linear, whole transformer) blocks, plus ResNet/sampler layers with enable_conv; SGM names for SDXL."""
    targets = UNET_TARGETS_ALL_LINEAR if enable_all_linear else UNET_TARGETS_ATTN_ONLY
    targets += UNET_TARGETS_CONV if enable_conv else ()
    sgm = SgmNames(unet.config) if is_sdxl_unet(unet) else None
    for name, module in unet.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            is_conv = isinstance(child, nn.Conv2d)
            if isinstance(child, nn.Linear) or (is_conv and (child.kernel_size == (1, 1) or enable_conv)):
                path = f"{name}.{child_name}"
                yield f"{OFT_PREFIX_UNET}.{sgm.to_sgm(path) if sgm else path}".replace(".", "_"), child


class OFTNetwork(NetworkBase):
    """All OFT modules of a UNet (sd-scripts' OFT trains no text encoder); the state dict is the OFT file."""

    def __init__(
        self,
        text_encoder,
        unet,
        multiplier: float = 1.0,
        dim: int = 4,
        alpha: float = DEFAULT_ALPHA,
        enable_all_linear: bool = False,
        enable_conv: bool = False,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.multiplier, self.dim, self.alpha = multiplier, dim, alpha
        self.unet_ofts: list[OFTModule] = []
        self.text_encoder_loras, self.unet_loras = [], self.unet_ofts  # NetworkBase's names for the module lists
        for name, layer in target_layers(unet, enable_all_linear, enable_conv):
            if modules_dim is not None:
                if name not in modules_dim:
                    continue
                dim, alpha = modules_dim[name], modules_alpha.get(name, DEFAULT_ALPHA)
            if name in self._modules:
                raise ValueError(f"duplicated oft name: {name}")
            oft = OFTModule(name, layer, multiplier, dim, alpha)
            self.unet_ofts.append(oft)
            self.add_module(name, oft)
        logger.info(
            f"OFT: {len(self.unet_ofts)} UNet modules, {self.dim} blocks, constraint {self.alpha}, "
            f"enable_all_linear {enable_all_linear}, enable_conv {enable_conv}"
        )

    def load_weights(self, file: str | os.PathLike):
        """Load an OFT file into this network (non-strict, as sd-scripts); returns the missing/unexpected keys."""
        sd = load_lora_state_dict(file)
        self.check_any_key_matches(file, sd, "an OFT file")
        return self.load_matching(file, sd, "--network_dim (blocks)")

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the modules into the UNet (the text encoder has none)."""
        if not apply_unet:
            raise UserError("networks.oft trains the UNet only; drop --network_train_text_encoder_only")
        for oft in self.unet_ofts:
            oft.apply_to()

    def merge_to(self, text_encoder, unet, weights_sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> None:
        """Load each module's blocks from ``weights_sd`` and rotate its base layer's weight (sd-scripts' merge)."""
        for oft in self.unet_ofts:
            head = oft.oft_name + "."
            oft.load_state_dict({k[len(head) :]: v for k, v in weights_sd.items() if k.startswith(head)}, strict=False)
            oft.to(device).merge_to(dtype, device)
        logger.info(f"merged {len(self.unet_ofts)} OFT modules")

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """One group of every block at the UNet learning rate (as sd-scripts); returns (groups, names)."""
        self.requires_grad_(True)
        params = list(self.parameters())
        logger.info(f"OFT params: {sum(p.numel() for p in params)}")
        lr = default_lr if unet_lr is None else unet_lr
        return ([{"params": params, "lr": lr}], ["unet"]) if params and lr else ([], [])


def parse_flag(kwargs: dict, key: str) -> bool:
    """A boolean network arg: true/false, 1/0, yes/no (absent: false)."""
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none"):
        return False
    raise UserError(f"--network_args {key}={value}: expected true or false")


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> OFTNetwork:
    """An OFT network from sd-scripts' flags: ``--network_dim`` blocks, ``--network_alpha`` constraint (default
    1e-3), ``enable_all_linear`` and ``enable_conv`` in ``--network_args``."""
    for key in kwargs:
        if key not in KNOWN_NETWORK_ARGS:
            logger.warning(f"--network_args {key}: not used by networks.oft (known: {', '.join(KNOWN_NETWORK_ARGS)})")
    if neuron_dropout:
        logger.warning("--network_dropout: OFT has no dropout (as in sd-scripts); ignored")
    network_dim = 4 if network_dim is None else int(network_dim)
    if network_alpha is None:
        network_alpha = DEFAULT_ALPHA
    elif network_alpha >= 1:
        logger.warning(f"--network_alpha {network_alpha} is large for OFT's constraint; consider a value like 1e-3")
    return OFTNetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        dim=network_dim,
        alpha=float(network_alpha),
        enable_all_linear=parse_flag(kwargs, "enable_all_linear"),
        enable_conv=parse_flag(kwargs, "enable_conv"),
    )


def create_network_from_weights(
    multiplier: float, file, vae, text_encoder, unet, weights_sd=None, for_inference: bool = False, **kwargs
) -> tuple[OFTNetwork, dict[str, torch.Tensor]]:
    """A network with exactly the modules of an OFT file (blocks and alpha per module); weights are not loaded.
    Returns the network and the file's tensors."""
    weights_sd = load_lora_state_dict(file) if weights_sd is None else weights_sd
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, tail = key.partition(".")
        if tail == "oft_blocks":
            modules_dim[name] = value.shape[0]
        elif tail == "alpha":
            modules_alpha[name] = float(value.float().item())
    if not modules_dim:
        raise UserError(f"{file}: no oft_blocks found; this is not an OFT file networks.oft can read")
    first = next(iter(modules_dim))
    network = OFTNetwork(
        text_encoder,
        unet,
        multiplier,
        dim=modules_dim[first],
        alpha=modules_alpha.get(first, DEFAULT_ALPHA),
        enable_all_linear=True,
        enable_conv=True,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
    )
    unknown = sorted(set(modules_dim) - set(network._modules))
    if unknown:
        raise UserError(f"{file}: {len(unknown)} OFT modules match no layer of this UNet (e.g. {unknown[0]})")
    return network, weights_sd
