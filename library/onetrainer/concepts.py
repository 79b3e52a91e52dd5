"""OneTrainer concepts -> dataset TOML subsets, and OneTrainer samples -> sd-scripts prompt lines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from library.errors import UserError
from library.onetrainer.config import CONCEPT_DEFAULTS

if TYPE_CHECKING:
    from library.onetrainer.mapping import Mapper

# OneTrainer's colour jitter -> our per-subset key (its maximum strength); ``<key>_fixed`` for its fixed variant,
# which applies the strength as it is (OneTrainer's enable_fixed_* reuses random_*_max_strength).
JITTER_KEYS = {
    "brightness": "brightness_aug",
    "contrast": "contrast_aug",
    "saturation": "saturation_aug",
    "hue": "hue_aug",
}

# OneTrainer's sampling noise schedulers -> our sampler names (None: no equivalent).
SAMPLERS: dict[str, str | None] = {
    "DDIM": "ddim",
    "EULER": "euler",
    "EULER_A": "euler_a",
    "DPMPP": "dpmsolver++",
    "DPMPP_SDE": None,
    "UNIPC": None,
    "EULER_KARRAS": None,
    "DPMPP_KARRAS": "dpm++_2m_karras",
    "DPMPP_SDE_KARRAS": "dpm++_2m_sde_karras",
    "UNIPC_KARRAS": None,
}

# SampleConfig's per-model defaults (width, height, steps, cfg, scheduler), from _get_model_defaults.
SAMPLE_DEFAULTS = {
    "sd1": (512, 512, 30, 7.5, "EULER_A"),
    "sd2": (768, 768, 30, 7.5, "DDIM"),
    "sdxl": (1024, 1024, 30, 7.5, "EULER_A"),
}


def parse_resolution(text: Any, where: str) -> tuple[int | list[int], str | None]:
    """OneTrainer's resolution text ("512", "768x512", "1024,768") as a TOML value, with a note when only the
    first of several resolutions is kept."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    note = f"several resolutions ({text}): only the first, {parts[0]}, is used" if len(parts) > 1 else None
    first = parts[0] if parts else ""
    try:
        if "x" in first:
            width, height = (int(v) for v in first.split("x"))
            return [width, height], note
        return int(first), note
    except ValueError:
        raise UserError(f"{where} = {text!r}: not a resolution (expected e.g. 512 or 768x512)") from None


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def random_augmentations(concepts: list[dict[str, Any]]) -> list[str]:
    """The enabled training concepts with a random rotation or colour jitter (which latent caching cannot hold)."""
    found = []
    for index, concept in enumerate(concepts):
        c = {**CONCEPT_DEFAULTS, **concept}
        if not c["enabled"] or c["type"] != "STANDARD":
            continue
        names = [("rotate", "image.random_rotate_max_angle")] + [
            (n, f"image.random_{n}_max_strength") for n in JITTER_KEYS
        ]
        if any(c[f"image.enable_random_{name}"] and float(c[key]) for name, key in names):
            found.append(f"concepts[{index}]" + (f" ({c['name']})" if c["name"] else ""))
    return found


def _subset(m: Mapper, concept: dict[str, Any], where: str, caching: bool) -> dict[str, Any]:
    """One concept as a ``[[datasets.subsets]]`` table; unmappable options are listed under ``where``."""
    c = {**CONCEPT_DEFAULTS, **concept}

    def unmapped(key: str, reason: str) -> None:
        m.out.unmapped.append(f"{where}.{key} = {_shown(c.get(key))}: {reason}")

    subset: dict[str, Any] = {"image_dir": str(c["path"])}
    if c["include_subdirectories"]:
        subset["recursive"] = True
    balancing = float(c["balancing"])
    if c["balancing_strategy"] == "SAMPLES":
        subset["balancing"] = int(balancing)
        subset["balancing_strategy"] = "samples"
    else:
        subset["num_repeats"] = _number(balancing)
    if float(c["loss_weight"]) != 1.0:
        subset["loss_weight"] = _number(float(c["loss_weight"]))
    for key in ("image_variations", "text_variations"):
        if int(c[key]) != 1:
            unmapped(key, "the cache holds one encoding per image (random crops/captions are drawn each step)")

    source = c["text.prompt_source"]
    if source == "sample":
        subset["caption_extension"] = ".txt"
    elif source == "filename":
        unmapped("text.prompt_source", "file names as captions are not supported; write .txt captions")
    else:
        unmapped("text.prompt_source", "one prompt file for the whole concept: use class_tokens or .txt captions")
    if c["text.enable_tag_shuffling"]:
        subset["shuffle_caption"] = True
        subset["keep_tokens"] = int(c["text.keep_tags_count"])
        if c["text.tag_delimiter"] != ",":
            subset["caption_separator"] = c["text.tag_delimiter"]
    if c["text.tag_dropout_enable"] and float(c["text.tag_dropout_probability"]):
        subset["caption_tag_dropout_rate"] = float(c["text.tag_dropout_probability"])
        if not c["text.enable_tag_shuffling"]:
            subset["keep_tokens"] = int(c["text.keep_tags_count"])
        if c["text.tag_dropout_mode"] != "FULL":
            unmapped("text.tag_dropout_mode", "only FULL (each tag dropped with the same probability)")
        if c["text.tag_dropout_special_tags_mode"] != "NONE":
            unmapped("text.tag_dropout_special_tags_mode", "special-tag lists are not supported")
    if c["text.caps_randomize_enable"]:
        unmapped("text.caps_randomize_enable", "caption capitalisation randomising is not supported")

    if c["image.enable_random_flip"]:
        subset["flip_aug"] = True
    if c["image.enable_fixed_flip"]:
        unmapped("image.enable_fixed_flip", "always-flipped images are not supported; flip the files")
    if c["image.enable_crop_jitter"]:
        if caching:
            unmapped("image.enable_crop_jitter", "not applied: random crops cannot be combined with latent caching")
        else:
            subset["random_crop"] = True
    angle = _number(float(c["image.random_rotate_max_angle"]))
    if c["image.enable_fixed_rotate"] and angle:
        subset["rotate_aug_fixed_angle"] = angle
    elif c["image.enable_random_rotate"] and angle:
        subset["rotate_aug_max_angle"] = angle
    for name, key in JITTER_KEYS.items():
        strength = _number(float(c[f"image.random_{name}_max_strength"]))
        if c[f"image.enable_fixed_{name}"] and strength:
            subset[f"{key}_fixed"] = strength
        elif c[f"image.enable_random_{name}"] and strength:
            subset[key] = strength
    for key in ("image.enable_random_circular_mask_shrink", "image.enable_random_mask_rotate_crop"):
        if c[key]:
            unmapped(key, "not supported (masks follow the image's own augmentations only)")
    return subset


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def concept_subsets(
    m: Mapper, concepts: list[dict[str, Any]], validation_off: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``[general]`` and the ``[[datasets]]`` (one per resolution) for the enabled concepts: VALIDATION concepts become
    ``is_val = true`` subsets, or are listed with ``validation_off`` (why) when OneTrainer would not validate."""
    resolution, note = parse_resolution(m.get("resolution"), "resolution")
    if note:
        m.out.unmapped.append(f"resolution = {m.config.get('resolution')}: {note}")
    caching = bool(m.out.flags.get("training", {}).get("cache_latents_to_disk"))
    by_resolution: dict[str, dict[str, Any]] = {}
    trained = 0
    for index, concept in enumerate(concepts):
        name = concept.get("name") or concept.get("path") or ""
        where = f"concepts[{index}]" + (f" ({name})" if name else "")
        kind = concept.get("type", "STANDARD")
        if not concept.get("enabled", True):
            m.out.unmapped.append(f"{where}.enabled = false: left out (disabled in OneTrainer)")
            continue
        if kind == "VALIDATION" and validation_off:
            m.out.unmapped.append(f"{where}.type = VALIDATION: {validation_off}")
            continue
        if kind not in ("STANDARD", "VALIDATION"):
            m.out.unmapped.append(f"{where}.type = {kind}: left out: prior-prediction concepts are not supported")
            continue
        if not concept.get("path"):
            raise UserError(f"{m.config.path}: {where} has no path; set the concept's image folder in OneTrainer")
        own = resolution
        if concept.get("image.enable_resolution_override"):
            text = concept.get("image.resolution_override", CONCEPT_DEFAULTS["image.resolution_override"])
            own, own_note = parse_resolution(text, f"{where}.image.resolution_override")
            if own_note:
                m.out.unmapped.append(f"{where}.image.resolution_override = {text}: {own_note}")
        dataset = by_resolution.setdefault(str(own), {"resolution": own, "subsets": []})
        try:
            subset = _subset(m, concept, where, caching)
            if kind == "VALIDATION":
                subset = {"image_dir": subset.pop("image_dir"), "is_val": True, **subset}
            else:
                trained += 1
            dataset["subsets"].append(subset)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"{m.config.path}: {where}: a setting has the wrong type ({e}); fix it in OneTrainer"
            ) from None
    if not trained:
        raise UserError(f"{m.config.path}: no enabled training concept (of {len(concepts)}); nothing to train on")
    general: dict[str, Any] = {"batch_size": int(m.get("batch_size"))}
    if m.get("aspect_ratio_bucketing"):
        general["enable_bucket"] = True
    return general, list(by_resolution.values())


def _family(model_type: str) -> str:
    if model_type.startswith("STABLE_DIFFUSION_XL"):
        return "sdxl"
    return "sd2" if model_type.startswith("STABLE_DIFFUSION_2") else "sd1"


def _clean(text: str) -> str:
    """One line, and no `` --`` that would start an option."""
    return " ".join(str(text).split()).replace(" --", " -")


def sample_lines(m: Mapper, samples: list[dict[str, Any]], model_type: str) -> list[str]:
    """Each enabled sample as ``prompt --n ... --w --h --d --l --s --ss`` (OneTrainer's per-model defaults filled)."""
    width, height, steps, cfg, scheduler = SAMPLE_DEFAULTS[_family(model_type)]
    lines = []
    for index, sample in enumerate(samples):
        try:
            line = _sample_line(m, sample, f"samples[{index}]", (width, height, steps, cfg, scheduler))
        except (TypeError, ValueError) as e:
            raise UserError(f"{m.config.path}: samples[{index}]: a setting has the wrong type ({e})") from None
        if line is not None:
            lines.append(line)
    return lines


def _sample_line(m: Mapper, sample: dict[str, Any], where: str, defaults: tuple) -> str | None:
    """One sample as a prompt line; None (listed) when it is disabled."""
    width, height, steps, cfg, scheduler = defaults
    if not sample.get("enabled", True):
        m.out.unmapped.append(f"{where}.enabled = false: left out (disabled in OneTrainer)")
        return None
    parts = [_clean(sample.get("prompt", ""))]
    negative = sample.get("negative_prompt", "")
    if negative:
        parts.append(f"--n {_clean(negative)}")
    parts.append(f"--w {int(sample.get('width', width))}")
    parts.append(f"--h {int(sample.get('height', height))}")
    if not sample.get("random_seed", False):
        parts.append(f"--d {int(sample.get('seed', 42))}")
    parts.append(f"--l {_number(float(sample.get('cfg_scale', cfg)))}")
    parts.append(f"--s {int(sample.get('diffusion_steps', steps))}")
    name = sample.get("noise_scheduler", scheduler)
    sampler = SAMPLERS.get(name)
    if sampler is None:
        m.out.unmapped.append(f"{where}.noise_scheduler = {name}: no such sampler here; euler_a is used")
        sampler = "euler_a"
    parts.append(f"--ss {sampler}")
    for key in ("text_encoder_1_layer_skip", "text_encoder_2_layer_skip"):
        if sample.get(key):
            m.out.unmapped.append(f"{where}.{key} = {sample[key]}: per-prompt clip skip is not supported")
    if sample.get("sample_inpainting"):
        m.out.unmapped.append(f"{where}.sample_inpainting = true: inpainting samples are not supported")
    return " ".join(parts)
