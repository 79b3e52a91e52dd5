"""sd-scripts' LoRA interrogation: run every token of the vocabulary (as ``<bos> token <eos>``) through the text
encoder with and without a LoRA's text-encoder modules and rank the tokens by how much their output moved (mean
absolute difference), which shows the words a LoRA was trained on."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from library.errors import UserError
from library.text.encode import run_text_encoder
from networks.lora import LORA_PREFIX_TEXT_ENCODER, LoRANetwork, normalize_state_dict

logger = logging.getLogger("sdtrain")

TOP_TOKENS = 100


def text_encoder_weights(sd: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The SD 1.x/2.x text-encoder part of a LoRA-family file (keys normalised to ``lora_te_text_model_…``);
    one-line UserErrors for a file without one, an SDXL file or non-finite weights."""
    sd = normalize_state_dict(dict(sd))
    if any(k.startswith((f"{LORA_PREFIX_TEXT_ENCODER}1_", f"{LORA_PREFIX_TEXT_ENCODER}2_")) for k in sd):
        raise UserError(
            f"{path}: an SDXL LoRA (lora_te1_/lora_te2_ keys); lora_interrogator.py handles SD 1.x/2.x LoRAs, as "
            "sd-scripts' does"
        )
    te = {k: v for k, v in sd.items() if k.startswith(f"{LORA_PREFIX_TEXT_ENCODER}_")}
    if not te:
        raise UserError(f"{path}: this LoRA has no text-encoder (lora_te_) modules, so there is nothing to interrogate")
    bad = sorted(k for k, v in te.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise UserError(f"{path}: {bad[0]} holds NaN/inf ({len(bad)} tensor(s)); see networks/check_lora_weights.py")
    return te


def load_into(network: LoRANetwork, te: dict[str, torch.Tensor], path: str | Path, model: str) -> None:
    """Load the text-encoder weights into ``network``; every module of the file must exist with the same shapes."""
    missing = sorted({k.split(".")[0] for k in te} - {m.lora_name for m in network.text_encoder_loras})
    if missing:
        raise UserError(
            f"{path}: {len(missing)} text-encoder module(s) are not in {model}'s text encoder (e.g. {missing[0]}); "
            "is the LoRA for another model (SD 1.x vs 2.x)?"
        )
    try:
        network.load_state_dict(network.own_names(te), strict=False)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(
            f"{path}: its text-encoder weights do not fit {model} ({detail[:200]}); is the LoRA for another model?"
        ) from None


def token_ids(tokenizer) -> range:
    """The ids sd-scripts tries: 0 to the largest special id (the whole CLIP vocabulary, ``<eos>`` last)."""
    return range(0, max(tokenizer.all_special_ids) + 1)


def _batches(tokenizer, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``<bos> id <eos>`` rows for every id of :func:`token_ids`, ``batch_size`` at a time."""
    ids = token_ids(tokenizer)
    for start in range(0, len(ids), batch_size):
        tokens = torch.arange(start, min(start + batch_size, len(ids)), device=device)
        bos = torch.full_like(tokens, tokenizer.bos_token_id)
        eos = torch.full_like(tokens, tokenizer.eos_token_id)
        yield torch.stack([bos, tokens, eos], dim=1)


@torch.no_grad()
def token_outputs(
    text_encoder: torch.nn.Module, tokenizer, batch_size: int, clip_skip: int | None, device: torch.device
) -> torch.Tensor:
    """The text encoder's states for every ``<bos> id <eos>``, ``(ids, 3, width)`` on the CPU in its dtype: the
    outputs without the LoRA, kept while it is applied (as sd-scripts does: a multiplier of 0 is not the base model
    for DoRA)."""
    outputs = []
    with tqdm(total=len(token_ids(tokenizer)), desc="base model", unit="tok", dynamic_ncols=True) as bar:
        for batch in _batches(tokenizer, batch_size, device):
            outputs.append(run_text_encoder(text_encoder, batch, clip_skip).cpu())
            bar.update(len(batch))
    return torch.cat(outputs)


@torch.no_grad()
def token_differences(
    text_encoder: torch.nn.Module,
    tokenizer,
    original: torch.Tensor,
    batch_size: int,
    clip_skip: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Mean |output now - ``original``| per token id (float32, indexed by id): run with the LoRA applied."""
    diffs = torch.empty(len(original), dtype=torch.float32)
    done = 0
    with tqdm(total=len(original), desc="with LoRA", unit="tok", dynamic_ncols=True) as bar:
        for batch in _batches(tokenizer, batch_size, device):
            states = run_text_encoder(text_encoder, batch, clip_skip).float().cpu()
            diffs[done : done + len(batch)] = (states - original[done : done + len(batch)].float()).abs().mean((1, 2))
            done += len(batch)
            bar.update(len(batch))
    return diffs


def ranked(diffs: torch.Tensor, count: int = TOP_TOKENS) -> list[tuple[int, float]]:
    """The ``count`` token ids whose output moved most, largest first (ties by id), with their differences."""
    values = diffs.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]
    return [(i, values[i]) for i in order]


def result_lines(diffs: torch.Tensor, tokenizer, count: int = TOP_TOKENS) -> list[str]:
    """sd-scripts' listing: ``top 100:`` then ``[rank]: id token: difference`` per line."""
    lines = [f"top {count}:"]
    for i, (token, diff) in enumerate(ranked(diffs, count)):
        string = tokenizer.decode([token])
        lines.append(f"[{i:3d}]: {token:5d} {string:<20s}: {diff:.5f}")
    return lines


def summary(diffs: torch.Tensor, seconds: float) -> str:
    """The closing line: tokens compared, how many moved at all, the largest difference, tokens per second."""
    moved = int((diffs > 0).sum())
    top = int(diffs.argmax())
    return (
        f"compared {len(diffs)} tokens in {seconds:.1f} s ({len(diffs) / max(seconds, 1e-9):.0f} tokens/s): "
        f"{moved} changed, largest {float(diffs[top]):.5f} (token {top})"
    )
