"""Convert a OneTrainer training config (its ``config.json`` export, with its concepts and samples) into our config
TOML, dataset TOML and sample-prompt file, plus a report listing each setting that could not be converted and why.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.onetrainer.config import load_onetrainer_config
from library.onetrainer.translate import convert
from library.onetrainer.writers import OutputFiles, write_outputs

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class ConvertSettings:
    """The flags: the OneTrainer config, where to write and under which names."""

    config: str
    output_dir: str
    concept_file: str | None = None
    sample_file: str | None = None
    config_name: str = "config.toml"
    dataset_name: str = "dataset.toml"
    prompts_name: str = "sample_prompts.txt"
    report_name: str = "onetrainer_report.txt"
    overwrite: bool = False


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("config", help="OneTrainer's config.json (exported from its UI or a training preset)")
    parser.add_argument("--output_dir", required=True, help="folder for the converted files")
    parser.add_argument("--concept_file", default=None, help="concepts JSON (default: inline or concept_file_name)")
    parser.add_argument(
        "--sample_file", default=None, help="samples JSON (default: inline or sample_definition_file_name)"
    )
    parser.add_argument("--config_name", default="config.toml", help="name of the config TOML (--config_file)")
    parser.add_argument("--dataset_name", default="dataset.toml", help="name of the dataset TOML (--dataset_config)")
    parser.add_argument("--prompts_name", default="sample_prompts.txt", help="name of the sample-prompt file")
    parser.add_argument("--report_name", default="onetrainer_report.txt", help="name of the report")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    return parser


def main(argv: Sequence[str]) -> None:
    settings = settings_from_flags(ConvertSettings, setup_parser().parse_args(argv))
    config = load_onetrainer_config(settings.config, settings.concept_file, settings.sample_file)
    conversion = convert(config)
    out = Path(settings.output_dir)
    files = OutputFiles(
        out / settings.config_name, out / settings.dataset_name, out / settings.prompts_name, out / settings.report_name
    )
    written = write_outputs(conversion, files, settings.overwrite)
    for path in written:
        print(f"wrote {path}")
    print(
        f"{conversion.script}: {len(conversion.unmapped)} setting(s) not converted, "
        f"{len(conversion.approximate)} converted with a difference (see {files.report}); "
        f"run: accelerate launch {conversion.script} --config_file {files.config}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
