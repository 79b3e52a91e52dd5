"""A randomly initialised model of a given architecture (``fine_tune.py --from_scratch_config``).

The architecture comes from a folder holding ``unet/``, ``vae/`` and the text encoders' ``config.json`` files (a
diffusers model folder works; its weights are ignored) or from a preset name (``tiny-sd1``, ``tiny-sd2``,
``tiny-sdxl``). The tokenizers are the packaged ones, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from library.errors import UserError
from library.models.components import Components
from library.models.detect import detect_diffusers, resolve_flags
from library.models.family import ModelFamily, family_named
from library.models.tiny import tiny_presets

FLAG = "--from_scratch_config"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"{FLAG} {path.parent.parent}: missing {path.parent.name}/config.json; a folder needs "
            f"unet/, vae/ and text encoder config.json files (or use a preset: {', '.join(tiny_presets())})"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{FLAG} {path}: unreadable JSON ({e}); fix or replace the file") from e


def architecture(spec: str) -> tuple[ModelFamily, dict[str, Any], bool | None]:
    """The family, its configs by subfolder name (text encoders as config objects) and the prediction type the
    folder's scheduler names (None when it names none) for a preset name or a config folder."""
    presets = tiny_presets()
    if spec in presets and not Path(spec).exists():
        family = family_named(spec.removeprefix("tiny-"))
        return family, family.tiny_configs(), None
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{FLAG} {spec}: neither a folder nor a preset; use a model folder or one of {', '.join(presets)}"
        )
    configs: dict[str, Any] = {name: _read_config(folder / name / "config.json") for name in ("unet", "vae")}
    configs["text_encoder"] = _read_config(folder / "text_encoder" / "config.json")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_config(scheduler_file) if scheduler_file.is_file() else None
    family, v_pred = detect_diffusers(configs, f"{FLAG} {spec}")
    for name, cls in zip(family.text_encoder_folders, family.text_encoder_classes):
        raw = configs[name] if name in configs else _read_config(folder / name / "config.json")
        configs[name] = cls.config_class.from_dict(raw)
    return family, configs, v_pred


def _build(what: str, spec: str, factory):
    try:
        return factory()
    except (TypeError, ValueError) as e:
        raise UserError(f"{FLAG} {spec}: the {what} config is not usable ({str(e).splitlines()[0]})") from e


def scratch_model(
    spec: str,
    *,
    seed: int,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    vae: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> Components:
    """A model of ``spec``'s architecture with fresh random weights drawn from ``seed`` (global RNG untouched);
    ``vae`` (``--vae``) replaces the random VAE with a trained one."""
    family, configs, info_v = architecture(spec)
    v_pred = resolve_flags(family, info_v, v2, v_parameterization, f"{FLAG} {spec}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _build("unet", spec, lambda: UNet2DConditionModel.from_config(configs["unet"]))
        random_vae = _build("vae", spec, lambda: AutoencoderKL.from_config(configs["vae"]))
        text_encoders = [
            _build(name, spec, lambda cls=cls, name=name: cls(configs[name]))
            for name, cls in zip(family.text_encoder_folders, family.text_encoder_classes)
        ]
    notes = [f"random weights (seed {seed}) of the architecture {spec}"]
    if vae is not None:
        from library.models.load import load_vae

        random_vae = load_vae(vae, allow_unsafe_pickle=allow_unsafe_pickle, reference=random_vae.config)
        notes.append(f"VAE from {vae}")
    width = sum(text_encoder.config.hidden_size for text_encoder in text_encoders)  # the UNet sees them joined
    if unet.config.cross_attention_dim != width:
        raise UserError(
            f"{FLAG} {spec}: the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs from the text "
            f"encoder's hidden_size {width}; make them equal"
        )
    return Components(
        unet=unet,
        vae=random_vae,
        text_encoders=text_encoders,
        tokenizers=family.packaged_tokenizers(),
        scheduler=family.noise_scheduler(v_pred),
        family=family,
        v_parameterization=v_pred,
        source=f"{FLAG} {spec}",
        notes=notes,
    )
