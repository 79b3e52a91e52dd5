"""``--config_file``: every flag from a TOML file (sections flattened, as sd-scripts does); the command line wins.

Beneath the config file lie the ``--preset`` overlays (``library.config.presets``); a config file may name its
presets with ``preset = "name"`` (or a list), used when the command line gives no ``--preset``.

Unlike sd-scripts, keys are checked: an unknown key is an error with a did-you-mean suggestion (keys the kohya_ss
GUI writes are skipped with a warning instead), and values are converted and checked like command-line values
(types, ranges, choices). ``--output_config`` writes the effective flags to the ``--config_file`` path instead of
training.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from library.config.values import Range, range_of
from library.errors import UserError
from library.io import atomic_write_text

logger = logging.getLogger("sdtrain")

NOT_WRITTEN = (
    "config_file",
    "output_config",
    "wandb_api_key",
    "huggingface_token",
    "preset",
    "preset_dir",
    "list_presets",
)
NOT_IN_FILE = ("config_file", "output_config", "list_presets")

# Keys the kohya_ss GUI (bmaltais/kohya_ss, kohya_gui/{lora,dreambooth,finetune,textual_inversion}_gui.py: the
# ``config_toml_data`` dict each writes for ``--config_file``, over every version of those files up to 45088f04)
# puts into config files, less the flags that all five SD 1.x/2.x sd-scripts training scripts define. Besides
# GUI-only keys (``epoch``, ``noise_offset_type``, ``weigts`` [sic]) these are other scripts' or other model
# families' flags (SDXL, SD3, FLUX, ...). sd-scripts ignores unknown keys; we skip these with a warning and
# reject any other unknown key (a typo).
KOHYA_SS_KEYS = frozenset(
    (
        "additional_parameters ae apply_t5_attn_mask attn_mode block_lr blocks_to_swap "
        "blockwise_fused_optimizers byt5 cache_text_encoder_outputs cache_text_encoder_outputs_to_disk "
        "caption_dropout_every_n_epochs caption_dropout_rate clip_g clip_g_dropout_rate clip_l "
        "clip_l_dropout_rate compile compile_backend compile_cache_size_limit compile_dynamic "
        "compile_fullgraph compile_mode cpu_offload_checkpointing dataset_repeats dim_from_weights "
        "disable_mmap_load_safetensors discrete_flow_shift double_blocks_to_swap enable_scaled_pos_embed "
        "epoch fp8_base_unet fp8_scaled fp8_vl fused_optimizer_groups gemma2 gemma2_max_token_length "
        "guidance_scale in_json init_word learning_rate_te learning_rate_te1 learning_rate_te2 "
        "llm_adapter_path logit_mean logit_std lora_network_weights loraplus_lr_ratio "
        "loraplus_text_encoder_lr_ratio loraplus_unet_lr_ratio lowvram masked_loss mem_eff_save mode_scale "
        "model_prediction_type model_type network_alpha network_args network_dim network_dropout "
        "network_module network_train_text_encoder_only network_train_unet_only network_weights no_half_vae "
        "no_token_padding noise_offset_type num_vectors_per_token pos_emb_random_crop_rate prior_loss_weight "
        "qwen3 qwen3_max_token_length qwen_image_vae_2d reg_data_dir save_clip save_t5xxl scale_weight_norms "
        "show_timesteps show_timesteps_resolution sigmoid_scale single_blocks_to_swap split_attn split_mode "
        "stop_text_encoder_training system_prompt t5_dropout_rate t5_max_token_length t5_tokenizer_path "
        "t5xxl t5xxl_device t5xxl_dtype t5xxl_max_token_length text_encoder text_encoder_batch_size "
        "text_encoder_cpu text_encoder_lr timestep_sampling token_string train_blocks train_inpainting "
        "train_text_encoder training_comment unet_lr unsloth_offload_checkpointing use_flash_attn "
        "use_object_template use_sage_attn use_style_template use_wandb vae_chunk_size vae_disable_cache "
        "weighted_captions weighting_scheme weights weigts "
    ).split()
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config_file``/``--output_config`` and the preset flags (``library.config.presets``)."""
    parser.add_argument("--config_file", type=str, default=None, help="read flags from this .toml file")
    parser.add_argument(
        "--output_config", action="store_true", help="write the effective flags to --config_file and exit"
    )
    parser.add_argument(
        "--preset",
        action="append",
        default=None,
        metavar="NAME",
        help="apply a named preset (or a preset .toml path) beneath --config_file and the command line; "
        "repeat to layer presets (a later one wins); see --list_presets",
    )
    parser.add_argument(
        "--preset_dir", type=str, default=None, help="a folder of your own presets (searched before the others)"
    )
    parser.add_argument(
        "--list_presets", action="store_true", help="list the available presets with their descriptions and exit"
    )


def config_path(value: str) -> Path:
    """sd-scripts adds ``.toml`` when the name has no such suffix."""
    return Path(value if value.endswith(".toml") else value + ".toml")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}


def flatten_sections(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Top-level keys and the keys of each ``[section]`` in one dict; a key set in two places is an error."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        section = f"[{name}]" if isinstance(value, dict) else "the top level"
        for key, item in items:
            if key in flat:
                raise UserError(
                    f"{shown_path(path)}: key '{key}' is set both in {where[key]} and in {section}; keep one"
                )
            flat[key], where[key] = item, section
    return flat


def _convert_one(value: Any, action: argparse.Action, where: str) -> Any:
    """One TOML scalar converted as argparse converts the flag's text; numbers range-checked as on the command line."""
    kind = action.type
    if isinstance(value, (dict, list)):
        shape = "a table" if isinstance(value, dict) else "a list"
        raise UserError(f"{where}: expected a single value, got {shape} {_short(value)}")
    checked = Range(kind) if kind in (int, float) else range_of(kind)
    if checked is not None:
        try:
            return checked.check(value.strip() if isinstance(value, str) else value)
        except ValueError as e:
            raise UserError(f"{where} {e}") from None
    if isinstance(value, bool):
        wanted = "text" if kind in (str, None) else "a value of this flag's kind"
        raise UserError(f"{where}: expected {wanted}, got {str(value).lower()}")
    try:
        if kind is str or kind is None:
            return str(value) if not isinstance(value, str) else value
        return kind(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{where}: invalid value {_short(value)} ({e})") from None


def convert_value(key: str, value: Any, action: argparse.Action, path: Path) -> Any:
    """Convert a TOML value the way argparse converts the same flag on the command line, then check choices."""
    where = f"{shown_path(path)}: {key}"
    if action.nargs == 0:
        if isinstance(value, int) and value in (0, 1):  # kohya_ss writes some switches as 1 (a bool is an int too)
            return bool(value)
        raise UserError(f"{where}: expected true or false, got {_short(value)}")
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        converted: Any = [_convert_one(v, action, where) for v in items]
        checked = converted
    else:
        converted = _convert_one(value, action, where)
        checked = [converted]
    if action.choices is not None:
        for item in checked:
            if item not in action.choices:
                options = ", ".join(str(c) for c in action.choices if c is not None)
                raise UserError(f"{where}: {item!r} is not one of: {options}")
    collapse = getattr(action, "collapse", None)
    if collapse is not None:
        try:
            converted = collapse(converted)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    return converted


def load_toml(path: Path, flag: str = "--config_file") -> dict[str, Any]:
    """The parsed file; every way reading or parsing can fail is one UserError naming the file (and ``flag``)."""
    shown = shown_path(path)
    try:
        if not path.is_file():
            raise UserError(f"{flag} {shown}: file not found")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{flag} {shown}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not a UTF-8 text file; save it as UTF-8 TOML") from None
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as e:
        raise UserError(f"{shown}: not valid TOML ({_one_line(e)})") from None
    except Exception as e:  # the toml package raises assorted types (AttributeError, IndexError) on some bad input
        raise UserError(f"{shown}: not valid TOML ({type(e).__name__}: {_one_line(e)})") from None


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags set in a config file, converted and checked against ``parser``.

    An empty string means unset (older kohya_ss GUIs write "" for every empty field). Keys the kohya_ss GUI writes
    that this script has no flag for are skipped with one warning line; any other unknown key is an error.
    """
    data = load_toml(path)
    actions = _actions(parser)
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in flatten_sections(data, path).items():
        if key in NOT_IN_FILE:
            raise UserError(
                f"{shown_path(path)}: '{key}' cannot be set inside a config file; pass it on the command line"
            )
        action = actions.get(key)
        if key == "preset":
            values[key] = _preset_names(value, path)
            continue
        if action is None and key == "datasets":
            raise UserError(f"{shown_path(path)}: [[datasets]] is dataset config; pass this file with --dataset_config")
        if action is None and key not in KOHYA_SS_KEYS:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{shown_path(path)}: unknown key '{key}'{hint}; remove it or check the flag name")
        if isinstance(value, str) and value == "":
            continue
        if action is None:
            ignored.append(key)
            continue
        values[key] = convert_value(key, value, action, path)
    if ignored:
        logger.warning(
            f"{shown_path(path)}: ignoring kohya_ss GUI setting(s) that {parser.prog} has no flag for: "
            f"{', '.join(ignored)}"
        )
    return values


def shown_path(path: Path) -> str:
    """A path for a one-line message: very long ones keep their end."""
    text = str(path)
    return text if len(text) <= 160 else "..." + text[-150:]


def _short(value: Any) -> str:
    """``repr`` of a value, cut to keep the message on one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(error: Exception) -> str:
    """An exception's message on one line, at most 200 characters."""
    return " ".join(str(error).split())[:200]


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace | None:
    """Parse ``argv`` on top of the ``--config_file`` values, on top of the ``--preset`` values; None when
    ``--output_config`` wrote the file or ``--list_presets`` printed the presets."""
    from library.config.presets import list_presets_text, load_presets

    first = parser.parse_args(argv)
    if getattr(first, "list_presets", False):
        print(list_presets_text(first.preset_dir))
        return None
    path = config_path(first.config_file) if getattr(first, "config_file", None) else None
    if path is None and getattr(first, "output_config", False):
        raise UserError("--output_config needs --config_file: the path to write the flags to")
    file_values = {} if path is None or first.output_config else read_config_file(path, parser)
    names = getattr(first, "preset", None) or file_values.pop("preset", None) or []
    file_values.pop("preset", None)
    preset_dir = getattr(first, "preset_dir", None) or file_values.get("preset_dir")
    values = {**load_presets(names, preset_dir, parser), **file_values} if names else file_values
    if path is not None and first.output_config:
        write_config_file(parser.parse_args(argv, namespace=argparse.Namespace(**values)), path)
        return None
    args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    if names:
        args.preset = list(names)
    return _started(parser, args)


def _preset_names(value: Any, path: Path) -> list[str]:
    """A config file's ``preset`` key: one name or a list of names (used when --preset is not given)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f'{shown_path(path)}: preset must be a preset name or a list of names, e.g. preset = "x"')
    return names


def _started(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Apply the logging flags."""
    from library.cli import apply_logging_flags

    apply_logging_flags(args)
    return args


def config_text(args: argparse.Namespace) -> str:
    """The flags of ``args`` as TOML (None values left out; paths as text)."""
    values: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_WRITTEN or value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        values[key] = value
    return toml.dumps(values)


def write_config_file(args: argparse.Namespace, path: Path) -> None:
    """sd-scripts' ``--output_config``: never overwrites an existing file."""
    if path.exists():
        raise UserError(f"--output_config: {path} already exists; choose another --config_file path or delete it")
    atomic_write_text(path, config_text(args))
