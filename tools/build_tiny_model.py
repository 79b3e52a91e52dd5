"""Build the bundled tiny-shapes model: generate the scenes, train the VAE, train UNet and text encoder from scratch
with ``fine_tune.py --from_scratch_config``, package it (diffusers layout, float16) and record its quality."""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.shapes.build import BucketStage, BuildSettings, build, reevaluate
from library.shapes.vae_training import VaeTrainSettings

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "library" / "data" / "tiny-shapes"


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    defaults = BuildSettings(output_dir=DEFAULT_OUTPUT, work_dir=Path())
    vae = VaeTrainSettings()
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="where the model goes")
    parser.add_argument("--work_dir", type=Path, default=None, help="data, VAE and checkpoints (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--images", type=int, default=defaults.images, help="training images to generate")
    parser.add_argument("--vae_channels", type=_channels, default=vae.channels, help="comma-separated, 4 levels")
    parser.add_argument("--vae_steps", type=int, default=vae.steps)
    parser.add_argument("--vae_batch_size", type=int, default=vae.batch_size)
    parser.add_argument("--vae_learning_rate", type=float, default=vae.learning_rate)
    parser.add_argument("--vae_decoder_steps", type=int, default=vae.decoder_steps, help="decoder-only refinement")
    parser.add_argument("--unet_channels", type=_channels, default=defaults.unet_channels)
    parser.add_argument("--text_width", type=int, default=defaults.text_width)
    parser.add_argument("--text_layers", type=int, default=defaults.text_layers)
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="stage 1's area budget (side)")
    parser.add_argument("--train_batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--max_train_steps", type=int, default=defaults.train_steps)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--learning_rate_te", type=float, default=defaults.learning_rate_te)
    parser.add_argument("--lr_warmup_steps", type=int, default=defaults.warmup_steps)
    stage = BucketStage()
    parser.add_argument("--bucket_resolution", type=int, default=stage.resolution, help="stage 2's area budget")
    parser.add_argument("--bucket_steps", type=int, default=stage.steps, help="stage 2's steps (0: no stage 2)")
    parser.add_argument("--bucket_learning_rate", type=float, default=stage.learning_rate)
    parser.add_argument("--bucket_learning_rate_te", type=float, default=stage.learning_rate_te)
    parser.add_argument("--bucket_warmup_steps", type=int, default=stage.warmup_steps)
    parser.add_argument("--bucket_from_step", type=int, default=None, help="stage-1 save to start from (default: end)")
    parser.add_argument("--eval_seeds", type=int, default=defaults.eval_seeds, help="seeds per held-out triple")
    parser.add_argument("--eval_steps", type=int, default=defaults.eval_steps, help="sampler steps")
    parser.add_argument("--eval_scale", type=float, default=defaults.eval_scale, help="CFG scale")
    parser.add_argument("--train_eval_count", type=int, default=defaults.train_eval_count)
    parser.add_argument(
        "--evaluate_only", action="store_true", help="only score the model in --output_dir again (updates build.json)"
    )
    parser.add_argument("--grid_dir", type=Path, default=None, help="save the held-out images here, one PNG per size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model / work folder")
    parser.add_argument(
        "--reuse_work_dir", action="store_true", help="keep the VAE and trained stages --work_dir already holds"
    )
    return parser


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(list(argv))
    logging.getLogger("library").setLevel(logging.INFO)
    vae = VaeTrainSettings(
        channels=args.vae_channels,
        steps=args.vae_steps,
        batch_size=args.vae_batch_size,
        learning_rate=args.vae_learning_rate,
        decoder_steps=args.vae_decoder_steps,
        warmup_steps=min(VaeTrainSettings.warmup_steps, args.vae_steps),
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="tiny-shapes-") as tmp:
        settings = BuildSettings(
            output_dir=args.output_dir,
            work_dir=args.work_dir if args.work_dir is not None else Path(tmp) / "work",
            seed=args.seed,
            images=args.images,
            vae=vae,
            unet_channels=args.unet_channels,
            text_width=args.text_width,
            text_layers=args.text_layers,
            resolution=args.resolution,
            batch_size=args.train_batch_size,
            train_steps=args.max_train_steps,
            learning_rate=args.learning_rate,
            learning_rate_te=args.learning_rate_te,
            warmup_steps=args.lr_warmup_steps,
            buckets=BucketStage(
                resolution=args.bucket_resolution,
                steps=args.bucket_steps,
                learning_rate=args.bucket_learning_rate,
                learning_rate_te=args.bucket_learning_rate_te,
                warmup_steps=args.bucket_warmup_steps,
                from_step=args.bucket_from_step,
            ),
            eval_seeds=args.eval_seeds,
            eval_steps=args.eval_steps,
            eval_scale=args.eval_scale,
            train_eval_count=args.train_eval_count,
            overwrite=args.overwrite,
            reuse_work_dir=args.reuse_work_dir,
        )
        if args.evaluate_only:
            reevaluate(settings, args.grid_dir)
        else:
            build(settings, args.grid_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main))
