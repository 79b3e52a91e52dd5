"""What a LoRA-family state dict holds: one ``ModuleWeights`` per module, the base model it is for, and the
model layers its module names refer to.

Module names follow sd-scripts and LyCORIS: ``lora_unet_<diffusers path>`` (SDXL: sd-scripts' SGM names),
``lora_te_text_model_…`` (``lora_te1_``/``lora_te2_`` for SDXL), sd-scripts' OFT ``oft_unet_…``. Text-encoder
names written without ``text_model`` (LyCORIS under transformers 5) are normalised on reading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from library.errors import UserError
from library.lora_family.diffusers_keys import is_diffusers_layout, to_sd_scripts
from library.models.sgm_names import SgmNames, is_sdxl_unet

ALGOS = ("lora", "loha", "lokr", "full", "oft")
"""Algorithms ``ModuleWeights.algo`` can name (LoRA/LoCon incl. DyLoRA, LoHa, LoKr, full diff, sd-scripts' OFT)."""

_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # algo: (keys that identify it, every key it may have besides alpha and dora_scale)
    "lora": (
        frozenset({"lora_down.weight", "lora_up.weight"}),
        frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"}),
    ),
    "loha": (
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    ),
    "lokr": (
        frozenset(),
        frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    ),
    "full": (frozenset({"diff"}), frozenset({"diff", "diff_b"})),
    "oft": (frozenset({"oft_blocks"}), frozenset({"oft_blocks"})),
}
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "oft_unet_")
_TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te\d?_)(encoder_|embeddings_|final_layer_norm)")


@dataclass(frozen=True)
class ModuleWeights:
    """One module of a LoRA-family file: its normalised name, algorithm, tensors (keys as written after the
    module name, e.g. ``lora_down.weight``, ``hada_w1_a``, ``dora_scale``; never ``alpha``) and alpha (None when
    the file has none)."""

    name: str
    algo: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def tucker(self) -> bool:
        """Whether a conv kernel is held in a Tucker core (``lora_mid``, ``hada_t1/t2``, ``lokr_t2``)."""
        return any(k in self.tensors for k in ("lora_mid.weight", "hada_t1", "lokr_t2"))

    @property
    def dora(self) -> bool:
        """Whether the module is weight-decomposed (DoRA: a ``dora_scale`` magnitude)."""
        return "dora_scale" in self.tensors

    @property
    def kind(self) -> str:
        """A label: ``lora``, ``locon-tucker``, ``loha``, ``loha-tucker``, ``lokr``, ``lokr-tucker``, ``full``,
        ``oft``, with ``+dora`` for weight-decomposed modules."""
        base = ({"lora": "locon"}.get(self.algo, self.algo) + "-tucker") if self.tucker else self.algo
        return base + ("+dora" if self.dora else "")

    @property
    def rank(self) -> int | None:
        """The low rank LyCORIS divides alpha by; None when the module has none (full, OFT, LoKr of two full
        factors)."""
        t = self.tensors
        if self.algo == "lora":
            return t["lora_down.weight"].shape[0]
        if self.algo == "loha":
            return t["hada_w1_b"].shape[0]
        if self.algo == "lokr":
            for key in ("lokr_w1_b", "lokr_w2_b"):
                if key in t:
                    return t[key].shape[0]
        return None

    @property
    def scale(self) -> float:
        """LyCORIS's scale: alpha / rank (alpha missing or 0: 1); 1 when there is no rank."""
        rank = self.rank
        if rank is None or not self.alpha:
            return 1.0
        return self.alpha / rank

    def delta_shape(self) -> tuple[int, ...]:
        """The shape ΔW is rebuilt in (conv kernels may come flattened into the second axis); OFT: its blocks'."""
        t = self.tensors
        if self.algo == "lora":
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            kernel = t["lora_mid.weight"].shape[2:] if "lora_mid.weight" in t else down.shape[2:]
            return (up.shape[0], down.shape[1], *kernel)
        if self.algo == "loha":
            if "hada_t1" in t:
                return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
            return (t["hada_w1_a"].shape[0], *t["hada_w1_b"].shape[1:])
        if self.algo == "lokr":
            w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
            if "lokr_w2" in t:
                w2 = tuple(t["lokr_w2"].shape)
            elif "lokr_t2" in t:
                w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
            else:
                w2 = (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        if self.algo == "full":
            return tuple(t["diff"].shape)
        blocks = t["oft_blocks"].shape
        return (blocks[0] * blocks[1],)

    def fits(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether the module can modify a layer whose weight has this shape (LoRA pairs must match the layer
        kind: a Linear pair does not fit a 1x1 conv)."""
        shape, delta = tuple(weight_shape), self.delta_shape()
        if self.algo == "oft":
            return shape[0] == delta[0] and shape[0] % self.tensors["oft_blocks"].shape[0] == 0
        if delta == shape:
            return True
        if self.algo in ("lora", "full"):
            return False
        return len(delta) == 2 and delta[0] == shape[0] and delta[1] == math.prod(shape[1:])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's file keys (``<name>.<key>``), alpha included when it has one."""
        sd = {f"{self.name}.{k}": v for k, v in self.tensors.items()}
        if self.alpha is not None:
            sd[f"{self.name}.alpha"] = torch.tensor(float(self.alpha))
        return sd


def normalize_module_name(name: str) -> str:
    """The standard spelling of a module name: text-encoder modules with ``text_model``."""
    m = _TE_WITHOUT_TEXT_MODEL.match(name)
    return f"{m.group(1)}text_model_{name[len(m.group(1)) :]}" if m else name


def _algo(name: str, keys: set[str]) -> str | None:
    for algo, (needed, allowed) in _KEYS.items():
        if algo == "lokr":
            ok = ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) and (
                "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
            )
        else:
            ok = needed <= keys
        if ok and keys <= allowed:
            return algo
    return None


def parse_modules(
    tensors: Mapping[str, torch.Tensor], source: str = "", metadata: Mapping[str, str] | None = None
) -> dict[str, ModuleWeights]:
    """Group a state dict into ``{module name: ModuleWeights}``; any key outside the known layouts is a one-line
    UserError naming ``source`` and an example key. diffusers/PEFT-layout files are renamed first (alphas from
    ``metadata``'s PEFT config, else alpha = rank, as diffusers reads them)."""
    where = f"{source}: " if source else ""
    if is_diffusers_layout(tensors):
        tensors = to_sd_scripts(tensors, metadata, source)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, dot, rest = key.partition(".")
        if not dot or not name.startswith(_PREFIXES):
            raise UserError(
                f"{where}unknown key layout (e.g. {key!r}); expected sd-scripts/LyCORIS keys like "
                "'lora_unet_….lora_down.weight' or 'lora_te_….hada_w1_a'"
            )
        grouped.setdefault(normalize_module_name(name), {})[rest] = value
    modules: dict[str, ModuleWeights] = {}
    for name, parts in grouped.items():
        alpha = parts.pop("alpha", None)
        keys = set(parts) - {"dora_scale"}
        algo = _algo(name, keys)
        if (algo == "oft") != name.startswith("oft_"):
            algo = None  # LyCORIS's own (diag-)OFT/BOFT under lora_ names has other math; not supported
        if algo is None or (algo in ("full", "oft") and "dora_scale" in parts):
            example = f"{name}.{min(parts) if parts else 'alpha'}"
            raise UserError(
                f"{where}unknown key layout for module {name} (keys: {', '.join(sorted(parts)) or 'alpha only'}; "
                f"e.g. {example!r}); not a LoRA/LoCon/LoHa/LoKr/full module or sd-scripts OFT (oft_unet_…) module"
            )
        modules[name] = ModuleWeights(name, algo, parts, None if alpha is None else float(alpha.float().item()))
    if not modules:
        raise UserError(f"{where}no LoRA-family modules in the file")
    return modules


@dataclass(frozen=True)
class BaseGuess:
    """Which base model a file is for: ``family`` is ``sd1``, ``sd2``, ``sdxl`` or None, with the evidence."""

    family: str | None
    reason: str


def detect_base(modules: Mapping[str, ModuleWeights], metadata: Mapping[str, str] | None = None) -> BaseGuess:
    """Guess the base model from module names and shapes (SGM names or ``lora_te1/2``: SDXL; text-encoder width
    768/1024 or 12/23 layers: SD1/SD2; a linear vs 1x1-conv ``proj_in``: SD2/SD1), then ``ss_*`` metadata."""
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return BaseGuess("sdxl", "two text encoders (lora_te1_/lora_te2_)")
    if any(re.match(r"(lora|oft)_unet_(input_blocks|middle_block|output_blocks|label_emb)_", n) for n in names):
        return BaseGuess("sdxl", "SGM UNet names (input_blocks_…)")
    for name, module in modules.items():
        if name.startswith("lora_te_text_model_encoder_layers_"):
            width = module.delta_shape()[1] if name.endswith(("_q_proj", "_k_proj", "_v_proj", "fc1")) else None
            if width in (768, 1024):
                return BaseGuess("sd1" if width == 768 else "sd2", f"text encoder width {width}")
            if int(name.split("_")[6]) >= 12:
                return BaseGuess("sd2", "more than 12 text-encoder layers")
    for name, module in modules.items():
        if name.startswith("lora_unet_") and name.endswith("_proj_in") and module.algo == "lora":
            linear = module.tensors["lora_down.weight"].dim() == 2
            return BaseGuess("sd2" if linear else "sd1", f"{'linear' if linear else '1x1 conv'} proj_in")
    meta = metadata or {}
    version = meta.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return BaseGuess("sdxl", f"ss_base_model_version {version}")
    if version.startswith("sd_v2") or meta.get("ss_v2") == "True":
        return BaseGuess("sd2", "metadata (ss_v2 / ss_base_model_version)")
    if version.startswith("sd_v1") or meta.get("ss_v2") == "False":
        return BaseGuess("sd1", "metadata (ss_v2 / ss_base_model_version)")
    return BaseGuess(None, "no name, shape or metadata says which model")


def _text_path(name: str) -> str:
    return name if name.startswith(("text_model", "text_projection")) else f"text_model.{name}"


def model_layers(components, diffusers_sdxl_names: bool = False) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of the UNet and text encoder(s), by the module name LoRA files use (networks/lora.py's
    rule). With ``diffusers_sdxl_names`` an SDXL UNet's layers are also listed under diffusers-spelled names
    (``lora_unet_down_blocks_…``, as LyCORIS writes them on a diffusers UNet)."""
    layers: dict[str, torch.nn.Module] = {}
    encoders = list(components.text_encoders)
    for i, encoder in enumerate(encoders):
        prefix = "lora_te" if len(encoders) == 1 else f"lora_te{i + 1}"
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                layers[f"{prefix}_{_text_path(path)}".replace(".", "_")] = module
    unet = components.unet
    sgm = SgmNames(unet.config) if is_sdxl_unet(unet) else None
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            name = f"lora_unet_{path if sgm is None else sgm.to_sgm(path)}".replace(".", "_")
            layers[name] = module
            if sgm is not None and diffusers_sdxl_names:
                layers.setdefault(f"lora_unet_{path}".replace(".", "_"), module)
    return layers


def layer_name(module_name: str) -> str:
    """The ``model_layers`` name a file's module modifies (OFT's ``oft_unet_`` is LoRA's ``lora_unet_``)."""
    return "lora_unet_" + module_name.removeprefix("oft_unet_") if module_name.startswith("oft_unet_") else module_name


def check_modules(
    modules: Mapping[str, ModuleWeights], components, source: str = "", metadata: Mapping[str, str] | None = None
) -> dict[str, torch.nn.Module]:
    """``{module name: layer}`` for a file's modules on a model; the first module with no layer or a wrong shape
    is a one-line UserError naming ``source``, the module, both shapes and the likely cause."""
    layers = model_layers(components, diffusers_sdxl_names=True)
    found: dict[str, torch.nn.Module] = {}
    for name, module in modules.items():
        layer = layers.get(layer_name(name))
        if layer is not None and module.fits(layer.weight.shape):
            found[name] = layer
            continue
        guess = detect_base(modules, metadata)
        family = getattr(components.family, "name", "?")
        if guess.family is not None and guess.family != family:
            cause = f"an {guess.family.upper()} file on an {family.upper()} model? ({guess.reason})"
        else:
            cause = "a file for another model (or a model of another width)?"
        where = f"{source}: " if source else ""
        if layer is None:
            raise UserError(f"{where}module {name} has no layer in this {family} model; {cause}")
        raise UserError(
            f"{where}module {name} ({module.kind}, ΔW {tuple(module.delta_shape())}) does not fit the layer's "
            f"weight {tuple(layer.weight.shape)}; {cause}"
        )
    return found
