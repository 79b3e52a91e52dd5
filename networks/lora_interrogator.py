"""Find the words a LoRA was trained on, as sd-scripts' networks/lora_interrogator.py: every token of the vocabulary
goes through the base model's text encoder with and without the LoRA's text-encoder modules, and the 100 tokens
whose output moved most are listed. Needs a LoRA with text-encoder (``lora_te_``) modules; SD 1.x/2.x.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.cli import ArgumentParser, run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.inspect.interrogate import (
    load_into,
    result_lines,
    summary,
    text_encoder_weights,
    token_differences,
    token_outputs,
)
from library.prep.common import pick_device
from networks.lora import create_network_from_weights, load_lora_state_dict

logger = logging.getLogger("sdtrain")


@dataclass(frozen=True)
class InterrogateSettings:
    """sd-scripts' flags (``--sd_model``, ``--model``, ``--v2``, ``--batch_size``, ``--clip_skip``) and ``--device``."""

    sd_model: str
    model: str
    v2: bool = False
    batch_size: int = 16
    clip_skip: int | None = None
    device: str | None = None


def setup_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--v2", action="store_true", help="the base model is SD 2.x (for single files)")
    parser.add_argument(
        "--sd_model", type=str, default=None, help="base model: a diffusers folder, a .safetensors/.ckpt or tiny-sd1"
    )
    parser.add_argument("--model", type=str, default=None, help="LoRA file to interrogate (.safetensors or .pt)")
    parser.add_argument("--batch_size", type=int, default=16, help="tokens per text-encoder batch")
    parser.add_argument("--clip_skip", type=int, default=None, help="use the N-th layer from the end (N >= 1)")
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    return parser


def parse(argv: Sequence[str]) -> InterrogateSettings:
    """Flags -> settings, with the checks sd-scripts leaves to a traceback."""
    args = setup_parser().parse_args(argv)
    for flag in ("sd_model", "model"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required: the {'base model' if flag == 'sd_model' else 'LoRA file'}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: use 1 or more")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip {args.clip_skip}: use 1 or more (1 is the last layer)")
    return settings_from_flags(InterrogateSettings, args)


def main(argv: Sequence[str]) -> None:
    from library.models.load import load_model

    settings = parse(argv)
    device = pick_device(settings.device)
    logger.info(f"loading LoRA: {settings.model}")
    te_weights = text_encoder_weights(load_lora_state_dict(settings.model), settings.model)
    logger.info(f"loading SD model: {settings.sd_model}")
    components = load_model(settings.sd_model, v2=settings.v2 or None)
    if len(components.text_encoders) != 1:
        raise UserError(
            f"--sd_model {settings.sd_model}: an {components.family.description} model with "
            f"{len(components.text_encoders)} text encoders; lora_interrogator.py handles SD 1.x/2.x, as sd-scripts'"
        )
    text_encoder, tokenizer = components.text_encoder, components.tokenizer
    network, _ = create_network_from_weights(1.0, settings.model, None, text_encoder, None, weights_sd=te_weights)
    load_into(network, te_weights, settings.model, settings.sd_model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # sd-scripts runs in fp16
    text_encoder.to(device, dtype=dtype).eval()
    start = time.perf_counter()
    batch, skip = settings.batch_size, settings.clip_skip
    original = token_outputs(text_encoder, tokenizer, batch, skip, device)
    network.apply_to(text_encoder, None, True, False)
    network.to(device, dtype=dtype).eval()
    logger.info(f"{len(network.text_encoder_loras)} text-encoder modules of the LoRA applied")
    diffs = token_differences(text_encoder, tokenizer, original, batch, skip, device)
    for line in result_lines(diffs, tokenizer):
        print(line)
    logger.info(summary(diffs, time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(run_cli(main))
