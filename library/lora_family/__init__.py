"""The LoRA-family file library the network tools share (merge, svd-merge, extract, resize, check, gen_img).

Files (``files.py``)
    ``read_lora_file(path, allow_unsafe_pickle=False) -> LoraFile`` (``.tensors``, ``.metadata``, ``.path``;
    diffusers/PEFT-layout files come back in sd-scripts names with their header's alphas, ``diffusers_keys.py``);
    ``write_lora_file(path, tensors, metadata=None, precision=None)`` (atomic; safetensors get ``sshs_*`` hashes;
    precision ``fp32``/``float``/``fp16``/``bf16`` or a dtype); ``save_dtype(name)``.
Layout (``layout.py``)
    ``parse_modules(tensors, source="", metadata=None) -> {name: ModuleWeights}`` (``.algo``
    lora/loha/lokr/full/oft, ``.tensors``, ``.alpha``, ``.tucker``, ``.dora``, ``.kind``, ``.rank``, ``.scale``,
    ``.delta_shape()``, ``.fits(shape)``, ``.state_dict()``); ``normalize_module_name``;
    ``detect_base(modules, metadata) -> BaseGuess(family, reason)``;
    ``model_layers(components, diffusers_sdxl_names=False) -> {name: nn.Module}``; ``layer_name(module_name)``;
    ``check_modules(modules, components, source="", metadata=None) -> {name: layer}`` (one-line UserError).
Math (``weights.py``)
    ``delta_weight(module, base=None, shape=None)``; ``merged_weight(base, module, multiplier=1.0)``;
    ``merged_bias(base_bias, module, multiplier=1.0)``; ``weight_decompose``; ``lora_delta``/``loha_delta``/
    ``lokr_delta``/``oft_rotation``; ``lora_from_delta(delta, rank, clamp_quantile=None, alpha=None) -> (up, down,
    alpha)``; ``svd_rank_for(singular_values, method, param, max_rank)``; ``rank_stats(singular_values, rank)``.

Typical merge: ``f = read_lora_file(p); mods = parse_modules(f.tensors, p); layers = check_modules(mods, comps, p)``
then ``layer.weight.copy_(merged_weight(layer.weight, mods[name], m))`` for each name.
"""

from library.lora_family.files import PRECISIONS, LoraFile, read_lora_file, save_dtype, write_lora_file
from library.lora_family.layout import (
    ALGOS,
    BaseGuess,
    ModuleWeights,
    check_modules,
    detect_base,
    layer_name,
    model_layers,
    normalize_module_name,
    parse_modules,
)
from library.lora_family.weights import (
    delta_weight,
    lora_from_delta,
    merged_bias,
    merged_weight,
    rank_stats,
    svd_rank_for,
    weight_decompose,
)

__all__ = [
    "ALGOS",
    "PRECISIONS",
    "BaseGuess",
    "LoraFile",
    "ModuleWeights",
    "check_modules",
    "delta_weight",
    "detect_base",
    "layer_name",
    "lora_from_delta",
    "merged_bias",
    "merged_weight",
    "model_layers",
    "normalize_module_name",
    "parse_modules",
    "rank_stats",
    "read_lora_file",
    "save_dtype",
    "svd_rank_for",
    "weight_decompose",
    "write_lora_file",
]
