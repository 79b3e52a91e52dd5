"""``modelspec.*`` keys (Stability AI's ModelSpec 1.0.0) written into saved models, as sd-scripts writes them."""

from __future__ import annotations

import argparse
import base64
import datetime
import mimetypes
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserError

if TYPE_CHECKING:
    from library.metadata import MetadataSettings
    from library.models.family import ModelFamily

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"


def build_modelspec(
    family: ModelFamily,
    v_parameterization: bool,
    lora: bool,
    textual_inversion: bool,
    timestamp: float,
    title: str | None = None,
    reso: Any = None,
    is_stable_diffusion_ckpt: bool | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    timesteps: tuple[int, int] | None = None,
    clip_skip: int | None = None,
    trigger_phrase: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
) -> dict[str, str]:
    """``modelspec.*`` keys (Stability AI's ModelSpec 1.0.0) as sd-scripts' sai_model_spec.build_metadata; the
    architecture and default resolution are the model ``family``'s."""
    arch = family.modelspec_architecture(v_parameterization)
    if lora:
        arch += "/lora"
    elif textual_inversion:
        arch += "/textual-inversion"
    if not lora and not textual_inversion and is_stable_diffusion_ckpt is None:
        is_stable_diffusion_ckpt = True
    stability = textual_inversion or is_stable_diffusion_ckpt or (lora and family.sgm_lora_names)
    impl = IMPL_STABILITY_AI if stability else IMPL_DIFFUSERS
    if title is None:
        title = ("LoRA" if lora else "TextualInversion" if textual_inversion else "Checkpoint") + f"@{timestamp}"
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": _resolution_string(reso, family.default_resolution(v_parameterization)),
    }
    for key, value in (
        ("description", description),
        ("author", author),
        ("license", license),
        ("tags", tags),
        ("merged_from", merged_from),
        ("trigger_phrase", trigger_phrase),
        ("usage_hint", usage_hint),
        ("thumbnail", thumbnail),
        ("preprocessor", preprocessor),
        ("is_negative_embedding", is_negative_embedding),
    ):
        if value is not None:
            md[f"modelspec.{key}"] = value
    md["modelspec.date"] = datetime.datetime.fromtimestamp(int(timestamp)).isoformat()
    md["modelspec.prediction_type"] = "v" if v_parameterization else "epsilon"
    if timesteps is not None:
        md["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    if clip_skip is not None:
        md["modelspec.encoder_layer"] = str(clip_skip)
    return md


def _resolution_string(reso: Any, default: int) -> str:
    if reso is None:
        reso = default
    if isinstance(reso, str):
        reso = tuple(int(r) for r in reso.split(","))
    if isinstance(reso, int):
        reso = (reso, reso)
    if len(reso) == 1:
        reso = (reso[0], reso[0])
    return f"{reso[0]}x{reso[1]}"


def modelspec_from_settings(
    settings: MetadataSettings,
    family: ModelFamily,
    v_parameterization: bool,
    lora: bool = True,
    textual_inversion: bool = False,
) -> dict[str, str]:
    """``modelspec.*`` for a save of a ``family`` model, from the flags' settings (sd-scripts'
    train_util.get_sai_model_spec)."""
    s = settings
    min_t, max_t = s.min_timestep, s.max_timestep
    timesteps = None if min_t is None and max_t is None else (min_t or 0, 1000 if max_t is None else max_t)
    return build_modelspec(
        family=family,
        v_parameterization=v_parameterization,
        lora=lora,
        textual_inversion=textual_inversion,
        timestamp=time.time(),
        title=s.metadata_title if s.metadata_title is not None else s.output_name,
        reso=s.resolution,
        author=s.metadata_author,
        description=s.metadata_description,
        license=s.metadata_license,
        tags=s.metadata_tags,
        timesteps=timesteps,
        clip_skip=s.clip_skip,
        trigger_phrase=s.metadata_trigger_phrase,
        usage_hint=s.metadata_usage_hint,
        thumbnail=thumbnail_data_url(s.metadata_thumbnail),
        merged_from=s.metadata_merged_from,
        preprocessor=s.metadata_preprocessor,
        is_negative_embedding=s.metadata_is_negative_embedding,
    )


def thumbnail_file(value: str) -> str:
    """argparse ``type=`` of ``--metadata_thumbnail``: a ``data:`` URL, or an existing image file (checked at
    start-up so a typo cannot fail the first save hours later)."""
    if value.startswith("data:") or Path(value).is_file():
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a data: URL nor an existing image file")


def thumbnail_data_url(value: str | None) -> str | None:
    """``modelspec.thumbnail``: a file's bytes as a base64 ``data:<mime type>;base64,...`` URL (as sd-scripts);
    a value that already is a data URL is kept."""
    if value is None or value.startswith("data:"):
        return value
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    try:
        data = Path(value).read_bytes()
    except OSError as e:
        raise UserError(f"--metadata_thumbnail {value}: cannot read the file ({e.strerror or e})") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
