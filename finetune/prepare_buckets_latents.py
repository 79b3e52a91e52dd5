"""sd-scripts' ``finetune/prepare_buckets_latents.py``: put every image of a folder in an aspect-ratio bucket, encode
it with the VAE into ``<image_key>.npz`` and record its ``train_resolution`` in the metadata JSON, so that
``fine_tune.py --in_json`` trains without encoding images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from library.cli import ArgumentParser, run_cli


def _on(value: str) -> bool:
    """sd-scripts' --alpha_mask takes a string and means 'on' when it is not empty; 'false'/'0'/'no' mean off."""
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def setup_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="folder of training images")
    parser.add_argument("in_json", type=str, help="metadata file to read")
    parser.add_argument("out_json", type=str, help="metadata file to write (may be in_json)")
    parser.add_argument("model_name_or_path", type=str, help="model or VAE to encode with (folder, file or tiny-sd1)")
    parser.add_argument("--v2", action="store_true", help="not used (kept for compatibility, as in sd-scripts)")
    parser.add_argument("--batch_size", type=int, default=1, help="images encoded at once")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None, help="threads decoding images")
    parser.add_argument("--max_resolution", type=str, default="512,512", help="area budget of the buckets: W,H")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="one bucket per image size, never enlarged")
    parser.add_argument(
        "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="VAE precision"
    )
    parser.add_argument("--full_path", action="store_true", help="key images by their path instead of their stem")
    parser.add_argument("--flip_aug", action="store_true", help="also store latents of the mirrored image")
    parser.add_argument(
        "--alpha_mask", type=str, nargs="?", const="true", default="", help="store the alpha channel as a loss mask"
    )
    parser.add_argument("--skip_existing", action="store_true", help="keep npz files still valid for their image")
    parser.add_argument("--recursive", action="store_true", help="also process images in sub-folders")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and each image's bucket")
    return parser


def main(argv: Sequence[str]) -> None:
    args = setup_parser().parse_args(argv)
    from library.prep.latents import LatentsJob, prepare_latents  # diffusers, after run_cli has quietened logging

    values = {**vars(args), "alpha_mask": _on(args.alpha_mask)}
    prepare_latents(LatentsJob(**values))


if __name__ == "__main__":
    sys.exit(run_cli(main))
