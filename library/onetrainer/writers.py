"""The converter's four files: config TOML, dataset TOML, sample-prompt file and the report, written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import toml

from library.errors import UserError
from library.io import atomic_write_text
from library.onetrainer.mapping import Conversion

SECTION_ORDER = (
    "model",
    "dataset",
    "training",
    "ema",
    "validation",
    "optimizer",
    "network",
    "embedding",
    "loss",
    "noise",
    "saving",
    "sampling",
    "logging",
)


@dataclass(frozen=True)
class OutputFiles:
    """Where the converter writes: the config TOML, dataset TOML, prompt file and report."""

    config: Path
    dataset: Path
    prompts: Path
    report: Path


def config_toml(conversion: Conversion, files: OutputFiles) -> str:
    """Our ``--config_file`` TOML (sections are flattened when read); it points at the dataset and prompt files."""
    flags = {k: dict(v) for k, v in conversion.flags.items()}
    flags.setdefault("dataset", {})["dataset_config"] = str(files.dataset)
    if conversion.prompts:
        flags.setdefault("sampling", {})["sample_prompts"] = str(files.prompts)
    else:
        flags.pop("sampling", None)
    ordered = {name: flags[name] for name in SECTION_ORDER if flags.get(name)}
    header = (
        f"# {conversion.script} settings converted from OneTrainer's {conversion.source}\n"
        f"# run: accelerate launch {conversion.script} --config_file {files.config}\n"
        f"# settings that could not be converted are listed in {files.report}\n\n"
    )
    return header + toml.dumps(ordered)


def dataset_toml(conversion: Conversion) -> str:
    """The dataset TOML (``--dataset_config``): one ``[[datasets]]`` per resolution, a subset per concept."""
    header = f"# dataset converted from OneTrainer's concepts ({conversion.source})\n\n"
    general = toml.dumps({"general": conversion.dataset["general"]})
    return header + general + "\n" + toml.dumps({"datasets": conversion.dataset["datasets"]})


def prompts_text(conversion: Conversion) -> str:
    """The sample prompts in sd-scripts' line syntax, one per line."""
    return "".join(f"{line}\n" for line in conversion.prompts or [])


def report_text(conversion: Conversion, files: OutputFiles) -> str:
    """Each OneTrainer setting not converted, and each converted with a difference, one per line with the reason."""
    lines = [
        f"# OneTrainer {conversion.source} -> {conversion.script}",
        f"# run: accelerate launch {conversion.script} --config_file {files.config}",
        f"not converted ({len(conversion.unmapped)}):",
        *(f"  {line}" for line in conversion.unmapped),
        f"converted with a difference ({len(conversion.approximate)}):",
        *(f"  {line}" for line in conversion.approximate),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(conversion: Conversion, files: OutputFiles, overwrite: bool) -> list[Path]:
    """Write the files (the prompt file only when there are samples); an existing file needs ``overwrite``."""
    planned = [(files.config, config_toml(conversion, files)), (files.dataset, dataset_toml(conversion))]
    if conversion.prompts:
        planned.append((files.prompts, prompts_text(conversion)))
    planned.append((files.report, report_text(conversion, files)))
    if not overwrite:
        for path, _ in planned:
            if path.exists():
                raise UserError(f"{path} already exists; pass --overwrite to replace it or choose another --output_dir")
    for path, text in planned:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return [path for path, _ in planned]
