"""Loading a model of any family from a diffusers folder, a Hugging Face repo id or a single checkpoint file."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from library.errors import UserError
from library.io import atomic_dir, check_safetensors, load_pickle_checkpoint, load_safetensors
from library.models.components import Components
from library.models.convert import VAE_PREFIX, vae_from_ldm
from library.models.detect import (
    detect_diffusers,
    detect_single_file,
    infer_vae_config,
    resolve_flags,
    shapes_agree,
    stored_configs,
)
from library.models.family import ModelFamily, families, family_named
from library.models.tiny import tiny_model, tiny_presets

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_checkpoint(
    path: Path, allow_unsafe_pickle: bool = False, disable_mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` or pickle checkpoint (``state_dict`` unwrapped);
    ``disable_mmap``: read a safetensors file's bytes instead of memory-mapping it."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return _read_safetensors_bytes(path) if disable_mmap else load_safetensors(path)
    if suffix not in PICKLE_EXTENSIONS:
        raise UserError(
            f"{path}: unknown model file extension '{path.suffix}'; use .safetensors, .ckpt, .pt or a diffusers folder"
        )
    try:
        obj = load_pickle_checkpoint(path, allow_unsafe=allow_unsafe_pickle)
    except UserError:
        raise
    except Exception as e:  # the unrestricted unpickler (allow_unsafe_pickle) raises anything on a corrupt file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a model checkpoint (it holds a {type(obj).__name__}, not a dict of tensors)")
    metadata = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors, metadata


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors_bytes(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """sd-scripts' ``--disable_mmap_load_safetensors``: the file read into memory with plain reads, not memory-mapped
    (slow on some file systems, e.g. WSL's). Each tensor is copied into its own storage: the weights are the
    process's own, where memory-mapped ones would follow later in-place changes to the file."""
    check_safetensors(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = torch.empty(path.stat().st_size - 8 - header_len, dtype=torch.uint8)
        f.readinto(memoryview(data.numpy()))
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(
                f"{path}: tensor {name} has dtype {info['dtype']}, unknown here; drop --disable_mmap_load_safetensors"
            )
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].clone().view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, metadata


def _build(cls_factory, state_dict: Mapping[str, torch.Tensor], what: str, source: str):
    """Create a model without allocating random weights and load ``state_dict`` into it strictly."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls_factory()
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as e:
        first = (str(e).splitlines()[1:2] or [str(e)])[0].strip()
        raise UserError(f"{source}: {what} weights do not match the model layout: {first[:300]}") from e
    return model.eval()


def _to_dtype(model, dtype: torch.dtype):
    """Cast only when needed (diffusers warns on every ``.to(dtype)``) and put the model in eval mode."""
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype=dtype)
    return model.eval()


def _make_unet(config: Mapping[str, Any], state_dict, source: str) -> UNet2DConditionModel:
    return _build(lambda: UNet2DConditionModel(**config), state_dict, "UNet", source)


def _make_vae(config: Mapping[str, Any], state_dict, source: str) -> AutoencoderKL:
    return _build(lambda: AutoencoderKL(**config), state_dict, "VAE", source)


def _make_text_encoder(cls: type, config: Mapping[str, Any], state_dict, source: str) -> torch.nn.Module:
    return _build(lambda: cls(cls.config_class(**config)), state_dict, "text encoder", source)


def _convert(key_error_source: str, fn, *args):
    try:
        return fn(*args)
    except KeyError as e:
        raise UserError(f"{key_error_source}: {e.args[0] if e.args else e}; the file does not fit this model") from e


@dataclass
class _Loaded:
    """What one source gave before the shared steps (VAE replacement, dtype, tokenizers, scheduler)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer | None]
    family: ModelFamily
    v_parameterization: bool
    notes: list[str]


def _load_single_file(
    path: Path, v2: bool | None, v_parameterization: bool | None, allow_unsafe_pickle: bool, disable_mmap: bool
):
    tensors, metadata = read_checkpoint(path, allow_unsafe_pickle, disable_mmap)
    source = str(path)
    info = detect_single_file(tensors, metadata, source)
    family, configs = info.family, info.configs
    v_pred = resolve_flags(family, info.v_parameterization, v2, v_parameterization, source)

    def part(name: str) -> dict[str, torch.Tensor]:
        return _convert(source, family.checkpoint_part, tensors, name, configs[name])

    unet = _make_unet(configs["unet"], part("unet"), source)
    vae = _make_vae(configs["vae"], part("vae"), source)
    text_encoders = [
        _make_text_encoder(cls, configs[name], part(name), source)
        for name, cls in zip(family.text_encoder_folders, family.text_encoder_classes)
    ]
    notes = [f"detected from {', '.join(info.evidence)}"]
    if not info.exact:
        notes.append("configs inferred from tensor shapes (SD head counts and group norm assumed)")
    return _Loaded(unet, vae, text_encoders, [None] * len(text_encoders), family, v_pred, notes)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from e


def _read_config(path: Path) -> dict[str, Any] | None:
    """A subfolder's ``config.json`` for family detection; None when absent or unreadable (loading reports that)."""
    try:
        return _read_json(path)
    except UserError:
        return None


def _load_diffusers_dir(folder: Path, v2: bool | None, v_parameterization: bool | None, source: str):
    configs = {p.parent.name: _read_config(p) for p in sorted(folder.glob("*/config.json"))}
    configs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    family, info_v = detect_diffusers(configs, source)
    for part in ("unet", "vae", *family.text_encoder_folders):
        if not (folder / part / "config.json").is_file():
            raise UserError(
                f"{source}: not a diffusers Stable Diffusion folder (missing {part}/config.json); "
                "pass a folder with model_index.json, unet/, vae/, text_encoder/ or a .safetensors/.ckpt file"
            )
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        text_encoders = [
            cls.from_pretrained(folder / name)
            for name, cls in zip(family.text_encoder_folders, family.text_encoder_classes)
        ]
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{source}: cannot load diffusers model ({str(e).splitlines()[0]})") from e
    tokenizers = [
        CLIPTokenizer.from_pretrained(folder / name, model_max_length=77) if (folder / name).is_dir() else None
        for name in family.tokenizer_folders
    ]
    v_pred = resolve_flags(family, info_v, v2, v_parameterization, source)
    return _Loaded(unet, vae, text_encoders, tokenizers, family, v_pred, [])


def _hub_enabled_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The local snapshot folder of a Hub repo (downloading the files matching ``patterns`` unless offline).

    ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read at call time, so a changed environment is honoured.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=patterns,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=_hub_enabled_offline(),
        )
    except Exception as e:  # hub errors are many types (offline, not found, gated, network); all mean the same here
        raise UserError(
            f"{repo_id}: cannot get this model from the Hugging Face Hub: it is not in the local cache and could not "
            f"be downloaded ({type(e).__name__}); check the id, your network / HF_HUB_OFFLINE, or pass a local path"
        ) from e
    return Path(folder)


def _hub_model_dir(repo_id: str, subfolders: tuple[str, ...], root_weights: bool = False) -> Path:
    """Snapshot of the files ``from_pretrained`` reads (configs, tokenizer, default-variant weights), not the
    repo's other checkpoints; ``.bin`` weights are fetched only where no safetensors exist."""
    folders = [f"{s}/" for s in subfolders] + ([""] if root_weights else [])
    base = ["model_index.json"] + [f"{f}*.json" for f in folders] + [f"{s}/*.txt" for s in subfolders]
    safe = [f"{f}{n}.safetensors" for f in folders for n in ("diffusion_pytorch_model", "model")]
    folder = hub_snapshot(repo_id, base + safe)
    if not _hub_enabled_offline() and not any(p.suffix == ".safetensors" for p in folder.rglob("*")):
        folder = hub_snapshot(
            repo_id, base + [f"{f}{n}.bin" for f in folders for n in ("diffusion_pytorch_model", "pytorch_model")]
        )
    return folder


def _hub_subfolders() -> tuple[str, ...]:
    """The diffusers subfolders a model of any family may need (its family is known only once they are here)."""
    text = [name for f in families() for name in (*f.text_encoder_folders, *f.tokenizer_folders)]
    return tuple(dict.fromkeys(["unet", "vae", *text, "scheduler"]))


def _is_repo_id(name: str) -> bool:
    return (
        bool(_REPO_ID.match(name))
        and not name.startswith((".", "/"))
        and Path(name).suffix.lower() not in (SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)
    )


def _tokenizers(
    found: list[CLIPTokenizer | None], family: ModelFamily, cache_dir: str | os.PathLike | None
) -> list[CLIPTokenizer]:
    """sd-scripts' ``--tokenizer_cache_dir``: reuse each tokenizer saved there, else save the one loaded (or the
    packaged one when the model has none)."""
    out = []
    for index, (tokenizer, cache_name) in enumerate(zip(found, family.tokenizer_cache_names)):
        cached = _cached_tokenizer(Path(cache_dir), cache_name) if cache_dir is not None else None
        if cached is not None:
            out.append(cached)
            continue
        if tokenizer is None:
            tokenizer = family.packaged_tokenizers()[index]
        if cache_dir is not None:
            with atomic_dir(Path(cache_dir) / cache_name) as tmp:
                tokenizer.save_pretrained(tmp)
        out.append(tokenizer)
    return out


def _cached_tokenizer(cache: Path, cache_name: str) -> CLIPTokenizer | None:
    for candidate in (cache / cache_name, cache):
        if any((candidate / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.json")):
            return CLIPTokenizer.from_pretrained(candidate, model_max_length=77)
    return None


BUNDLED_MODELS = ("tiny-shapes",)
"""Pretrained models shipped inside the package (``library/data/<name>``), loadable by name."""


def bundled_model_dir(name: str) -> Path:
    """The folder of the bundled model ``name``; a one-line UserError when this install lacks it."""
    from importlib import resources

    folder = Path(str(resources.files("library") / "data" / name))
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"{name}: the bundled model is missing from this install ({folder}); reinstall, or rebuild it with "
            "tools/build_tiny_model.py"
        )
    return folder


def load_model(
    name_or_path: str | os.PathLike,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    vae: str | os.PathLike | None = None,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    allow_unsafe_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    disable_mmap: bool = False,
) -> Components:
    """Load a model: a diffusers folder, a Hub repo id (through the normal cache), a single file or a built-in
    tiny model name (``tiny-sd1``: random weights; ``tiny-shapes``: the bundled pretrained model) — an existing file
    or folder of that name wins.

    ``v2`` / ``v_parameterization`` are the flags (None when not given); ``vae`` replaces the VAE; ``disable_mmap``
    reads a single ``.safetensors`` file into memory instead of memory-mapping it.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        parts = _load_single_file(path, v2, v_parameterization, allow_unsafe_pickle, disable_mmap)
    elif path.is_dir():
        parts = _load_diffusers_dir(path, v2, v_parameterization, name)
    elif _is_repo_id(name):
        parts = _load_diffusers_dir(_hub_model_dir(name, _hub_subfolders()), v2, v_parameterization, name)
    elif name in BUNDLED_MODELS:
        parts = _load_diffusers_dir(bundled_model_dir(name), v2, v_parameterization, name)
    elif name in tiny_presets():
        tiny = tiny_model(family_named(name.removeprefix("tiny-")), v_parameterization)
        note = f"{name}: tiny random-weight model built on the spot (for demos and tests)"
        parts = _Loaded(
            tiny.unet, tiny.vae, tiny.text_encoders, tiny.tokenizers, tiny.family, tiny.v_parameterization, [note]
        )
    else:
        raise UserError(f"{name}: model file or folder not found; check --pretrained_model_name_or_path")
    if vae is not None:
        parts.vae = load_vae(vae, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle, reference=parts.vae.config)
        parts.notes.append(f"VAE replaced from {vae}")
    for model in (parts.unet, parts.vae, *parts.text_encoders):
        _to_dtype(model, dtype)
    return Components(
        unet=parts.unet,
        vae=parts.vae,
        text_encoders=parts.text_encoders,
        tokenizers=_tokenizers(parts.tokenizers, parts.family, tokenizer_cache_dir),
        scheduler=parts.family.noise_scheduler(parts.v_parameterization),
        family=parts.family,
        v_parameterization=parts.v_parameterization,
        source=name,
        notes=parts.notes,
    )


def load_vae(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    allow_unsafe_pickle: bool = False,
    reference: Mapping[str, Any] | None = None,
) -> AutoencoderKL:
    """Load a VAE from a single file (LDM keys with or without ``first_stage_model.``), a diffusers folder (with or
    without a ``vae/`` subfolder) or a Hub repo id.

    For a single file without our stored config, ``reference`` (the base model's VAE config) supplies what shapes
    cannot tell (group-norm size, scaling factor) when its layout matches.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        vae = _vae_from_file(path, allow_unsafe_pickle, reference)
    elif path.is_dir() or _is_repo_id(name):
        folder = path if path.is_dir() else _hub_model_dir(name, ("vae",), root_weights=True)
        target = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
        if not (target / "config.json").is_file():
            raise UserError(f"{name}: not a diffusers VAE (no config.json here or in a vae/ subfolder)")
        try:
            vae = AutoencoderKL.from_pretrained(target)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{name}: cannot load VAE ({str(e).splitlines()[0]})") from e
    else:
        raise UserError(f"{name}: VAE file or folder not found; check --vae")
    return _to_dtype(vae, dtype)


def _vae_from_file(path: Path, allow_unsafe_pickle: bool, reference: Mapping[str, Any] | None) -> AutoencoderKL:
    tensors, metadata = read_checkpoint(path, allow_unsafe_pickle)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in tensors) else ""
    try:
        inferred = infer_vae_config(tensors, prefix)
    except KeyError:
        raise UserError(
            f"{path}: not a VAE in LDM layout (no 'encoder.down.0.block.0.conv1.weight', with or without "
            f"'{VAE_PREFIX}'); pass an LDM-format VAE file or a diffusers VAE folder"
        ) from None
    stored = stored_configs(metadata, str(path))
    if stored is not None:
        config = stored["vae"]
    elif reference is not None and shapes_agree(inferred, reference):
        config = {k: v for k, v in reference.items() if not k.startswith("_")}
    else:
        config = inferred
    return _make_vae(config, _convert(str(path), vae_from_ldm, tensors, config, prefix), str(path))
