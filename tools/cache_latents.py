"""Cache a dataset's latents to disk ahead of training, as sd-scripts' tools/cache_latents.py: the same
``<stem>_<WWWW>x<HHHH>_sd.npz`` (SDXL ``_sdxl.npz``) files a training run with ``--cache_latents_to_disk`` writes,
so that run then encodes nothing. Takes the training flags (model, ``--dataset_config`` or ``--train_data_dir``,
resolution, buckets, ``--vae``, ``--vae_batch_size``, ``--skip_cache_check``, ``--config_file``).

The VAE encodes in the precision training caches with (the model's own, float32), because the cache key names the
VAE's weights: ``--mixed_precision`` and ``--no_half_vae`` are accepted from sd-scripts command lines and change
nothing here. Interrupted runs resume: every finished image already has its valid file, which is reused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.config.config_file import parse_args_with_config
from library.config.dataset_config import dataset_flags
from library.config.parsers import training_parser
from library.config.sdxl_flags import SDXL_FAMILIES
from library.dataset.latent_cache import npz_path_for
from library.dataset.loader import TrainDataset, attach_latent_cache, build_train_dataset
from library.errors import UserError
from library.prep.common import PrepReport

logger = logging.getLogger("sdtrain")

STYLES = {"dreambooth", "finetune"}


def setup_parser() -> ArgumentParser:
    parser = training_parser(__doc__)
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (checked; files end _sdxl.npz)")
    parser.add_argument(
        "--skip_existing",
        action="store_true",
        help="does nothing, as in sd-scripts: existing files are always checked (--skip_cache_check trusts them)",
    )
    return parser


def main(argv: Sequence[str]) -> None:
    args = parse_args_with_config(setup_parser(), argv)
    if args is not None:
        cache_to_disk(args)


def _file_times(train: TrainDataset, suffix: str) -> dict[Path, int | None]:
    """Each record's cache file -> its mtime (None when missing), to count the files this run writes."""
    times: dict[Path, int | None] = {}
    for recs in train.records:
        for record in recs:
            path = npz_path_for(record.path, record.size, suffix)
            times[path] = path.stat().st_mtime_ns if path.is_file() else None
    return times


def cache_to_disk(args: argparse.Namespace) -> PrepReport:
    """Scan the dataset, load the VAE, encode every image without a valid cache file; log the summary."""
    from accelerate import PartialState

    from library.config.runtime_flags import process_group_kwargs
    from library.engine.launch import load_base_model, model_source
    from library.engine.tracking import launch_device, launched_processes

    if args.skip_existing:
        logger.warning("--skip_existing does nothing (as in sd-scripts); --skip_cache_check trusts existing files")
    flags = dataset_flags(args, cache_latents=True, cache_latents_to_disk=True, debug_dataset=False)
    train = build_train_dataset(flags, STYLES, seed=args.seed or 0)  # no VAE yet: scan and check the dataset first
    components = load_base_model(model_source(args))
    if args.sdxl and components.family.name not in SDXL_FAMILIES:
        raise UserError(
            f"--sdxl: {components.source or 'the base model'} is an {components.family.description} model, not "
            "SDXL; leave out --sdxl"
        )
    device = launch_device()
    components.vae.to(device).requires_grad_(False).eval()
    processes = PartialState(
        cpu=device.type == "cpu" and launched_processes() > 1, **process_group_kwargs(args.ddp_timeout)
    )
    suffix = components.family.latents_npz_suffix
    before = _file_times(train, suffix)
    report = PrepReport("cache_latents")
    cached = attach_latent_cache(
        train,
        components.vae,
        to_disk=True,
        batch_size=flags.vae_batch_size or max(d.batch_size for d in train.datasets),
        skip_check=flags.skip_cache_check,
        flag="--cache_latents_to_disk",
        process_index=processes.process_index,
        num_processes=processes.num_processes,
        barrier=processes.wait_for_everyone,
        latents_npz_suffix=suffix,
    )
    after = _file_times(cached, suffix)
    report.processed = report.written = sum(1 for path, t in after.items() if t is not None and t != before.get(path))
    report.skipped = len(after) - report.processed
    report.failed.extend(str(path) for path, _ in cached.skipped)  # each was warned about as it was found
    if processes.is_main_process:
        report.log(f"{len(after)} {suffix} file(s) beside the images; train with --cache_latents_to_disk")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
