"""A randomly initialised SD 1.x/2.x model of a given architecture (``fine_tune.py --from_scratch_config``).

The architecture comes from a folder holding ``unet/``, ``vae/`` and ``text_encoder/`` ``config.json`` files (a
diffusers model folder works; its weights are ignored) or from a preset name (``tiny-sd1``, ``tiny-sd2``). The
tokenizer is the packaged one, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models.components import Components
from library.models.detect import detect_diffusers, resolve_flags
from library.models.tiny import sd_scheduler, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config
from library.text.tokenizer import load_packaged_tokenizer

PRESETS = {"tiny-sd1": False, "tiny-sd2": True}
FLAG = "--from_scratch_config"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"{FLAG} {path.parent.parent}: missing {path.parent.name}/config.json; a folder needs "
            "unet/, vae/ and text_encoder/ config.json files (or use a preset: tiny-sd1, tiny-sd2)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{FLAG} {path}: unreadable JSON ({e}); fix or replace the file") from e


def architecture(spec: str) -> tuple[dict[str, Any], dict[str, Any], CLIPTextConfig, dict[str, Any] | None]:
    """UNet, VAE, text-encoder and scheduler configs for a preset name or a config folder."""
    if spec in PRESETS and not Path(spec).exists():
        v2 = PRESETS[spec]
        return tiny_unet_config(v2), tiny_vae_config(), tiny_text_encoder_config(v2), None
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{FLAG} {spec}: neither a folder nor a preset; use a model folder or one of tiny-sd1, tiny-sd2"
        )
    unet = _read_config(folder / "unet" / "config.json")
    vae = _read_config(folder / "vae" / "config.json")
    text = CLIPTextConfig.from_dict(_read_config(folder / "text_encoder" / "config.json"))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_config(scheduler_file) if scheduler_file.is_file() else None
    return unet, vae, text, scheduler


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
    unet_config, vae_config, text_config, scheduler_config = architecture(spec)
    info_v2, info_v = detect_diffusers(text_config, scheduler_config)
    is_v2, v_pred = resolve_flags(info_v2, info_v, v2, v_parameterization, f"{FLAG} {spec}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _build("unet", spec, lambda: UNet2DConditionModel.from_config(unet_config))
        random_vae = _build("vae", spec, lambda: AutoencoderKL.from_config(vae_config))
        text_encoder = _build("text_encoder", spec, lambda: CLIPTextModel(text_config))
    notes = [f"random weights (seed {seed}) of the architecture {spec}"]
    if vae is not None:
        from library.models.load import load_vae

        random_vae = load_vae(vae, allow_unsafe_pickle=allow_unsafe_pickle, reference=random_vae.config)
        notes.append(f"VAE from {vae}")
    if unet.config.cross_attention_dim != text_config.hidden_size:
        raise UserError(
            f"{FLAG} {spec}: the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs from the text "
            f"encoder's hidden_size {text_config.hidden_size}; make them equal"
        )
    return Components(
        unet=unet,
        vae=random_vae,
        text_encoder=text_encoder,
        tokenizer=load_packaged_tokenizer(v2=is_v2),
        scheduler=sd_scheduler(v_pred),
        v2=is_v2,
        v_parameterization=v_pred,
        source=f"{FLAG} {spec}",
        notes=notes,
    )
