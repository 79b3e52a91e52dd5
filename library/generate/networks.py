"""LoRA-family files on a model for generation, through sd-scripts' network-module interface.

Any module with ``create_network_from_weights`` works (``networks.lora`` and what it reads, ``networks.oft``,
``lycoris.kohya``): a network is hooked (``apply_to`` + ``load_state_dict``) or, with ``--network_merge``, merged
into the weights (``merge_to``). ``applied`` undoes either when its block ends, so a grid can put one set of files
on, generate, and put the next set on the same model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from library.errors import UserError
from library.models.components import Components
from library.recipes import lycoris_compat
from library.recipes.network import import_network_module, network_text_encoder

logger = logging.getLogger("sdtrain")

OFT_PREFIXES = ("oft_unet_", "oft_te_", "oft_te1_", "oft_te2_")


@dataclass(frozen=True)
class NetworkFile:
    """One network to put on the model: its file, module (None: chosen from the keys), multiplier and the module's
    keyword arguments (sd-scripts' ``--network_args`` ``key=value;key=value``)."""

    path: str
    module: str | None = None
    multiplier: float = 1.0
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return Path(self.path).stem


def parse_options(text: str | None, where: str) -> tuple[tuple[str, str], ...]:
    """sd-scripts' per-network ``key=value;key=value`` as pairs."""
    pairs = []
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{where}: {item!r} is not key=value; write e.g. 'preset=attn-mlp;algo=lora'")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def file_keys(path: str) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a network file (safetensors header only; pickles are read whole)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: network file not found")
    if file.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys()), dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    from networks.lora import load_lora_state_dict

    return list(load_lora_state_dict(file)), {}


def module_for(spec: NetworkFile) -> str:
    """The network module of ``spec``: the one given, else ``networks.oft`` for sd-scripts' OFT keys, else
    ``networks.lora`` (which reads LoRA, LoCon and the other key layouts it knows)."""
    if spec.module:
        return spec.module
    keys, _ = file_keys(spec.path)
    return "networks.oft" if any(k.startswith(OFT_PREFIXES) for k in keys) else "networks.lora"


def file_label(path: str) -> str:
    """A grid label for a network file: its name, with the epoch from ``ss_epoch`` metadata when present."""
    _, metadata = file_keys(path)
    epoch = metadata.get("ss_epoch")
    return f"{Path(path).stem} (epoch {epoch})" if epoch else Path(path).stem


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[-1] if lines and "size mismatch" not in lines[0] else (lines or [""])[0]).strip()[:240]


def _mismatch(spec: NetworkFile, error: BaseException) -> UserError:
    return UserError(
        f"{spec.path}: does not fit this model ({type(error).__name__}: {_first_line(error)}); "
        "is it a network for another model type (SD1/SD2/SDXL)?"
    )


def _build(components: Components, spec: NetworkFile, module_name: str):
    module = import_network_module(module_name)
    c = components
    try:
        network, weights = lycoris_compat.create_network_from_weights(
            module,
            spec.multiplier,
            spec.path,
            c.vae,
            network_text_encoder(c),
            c.unet,
            for_inference=True,
            **dict(spec.options),
        )
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, AssertionError, IndexError) as e:
        raise _mismatch(spec, e) from e
    if network is None:
        raise UserError(f"{spec.path}: {module_name}.create_network_from_weights returned nothing")
    return network, weights


def _check_matched(spec: NetworkFile, weights: dict[str, torch.Tensor], unexpected: Sequence[str]) -> None:
    if weights and len(unexpected) >= len(weights):
        raise UserError(
            f"{spec.path}: no key of this file matches the model; is it a network for another model type "
            "(SD1/SD2/SDXL)?"
        )
    if unexpected:
        modules = sorted({k.split(".")[0] for k in unexpected})
        logger.warning(f"{spec.path}: {len(modules)} modules match no layer of this model (unused), e.g. {modules[0]}")


def _hook(components: Components, spec: NetworkFile, module_name: str, device: torch.device, dtype: torch.dtype):
    network, weights = _build(components, spec, module_name)
    c = components
    network.apply_to(network_text_encoder(c), c.unet)
    if hasattr(network, "own_names"):  # networks.lora: SDXL UNet keys in diffusers spelling, old TE spellings
        weights = network.own_names(weights)
    try:
        info = network.load_state_dict(weights, False)
    except RuntimeError as e:
        raise _mismatch(spec, e) from e
    _check_matched(spec, weights, list(getattr(info, "unexpected_keys", [])))
    network.to(device, dtype)
    network.eval()
    return network


def _merge(components: Components, spec: NetworkFile, module_name: str, device: torch.device, dtype: torch.dtype):
    network, weights = _build(components, spec, module_name)
    if hasattr(network, "is_mergeable") and not network.is_mergeable():
        logger.warning(f"{spec.path}: {module_name} cannot merge; it is hooked instead")
        return _hook(components, spec, module_name, device, dtype)
    own = set(network.state_dict())
    unexpected = [k for k in weights if k not in own]
    _check_matched(spec, weights, unexpected)
    c = components
    try:
        network.merge_to(network_text_encoder(c), c.unet, weights, dtype, device)
    except RuntimeError as e:
        raise _mismatch(spec, e) from e
    return None


def _base_modules(components: Components) -> list[torch.nn.Module]:
    return [m for root in (components.unet, *components.text_encoders) for m in root.modules()]


@contextlib.contextmanager
def applied(
    components: Components,
    specs: Sequence[NetworkFile],
    *,
    merge: bool,
    device: torch.device,
    dtype: torch.dtype,
    restore: bool = True,
) -> Iterator[list[str]]:
    """Put ``specs`` on the model (hooked, or merged with ``merge``) for the block; yields ``name:weight`` labels.

    With ``restore`` every base layer gets its own ``forward`` back on exit and, after a merge, its weights (a copy
    is kept while the block runs), so the model is as before."""
    if not specs:
        yield []
        return
    modules = _base_modules(components)
    forwards = [(m, m.__dict__.get("forward")) for m in modules]
    saved = (
        [(p, p.detach().clone()) for root in (components.unet, *components.text_encoders) for p in root.parameters()]
        if merge and restore
        else []
    )
    try:
        for spec in specs:
            module_name = module_for(spec)
            how = "merged" if merge else "hooked"
            (_merge if merge else _hook)(components, spec, module_name, device, dtype)
            logger.info(f"network {spec.path} ({module_name}, multiplier {spec.multiplier:g}) {how}")
        yield [f"{spec.name}:{spec.multiplier:g}" for spec in specs]
    finally:
        for module, forward in forwards if restore else []:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)
