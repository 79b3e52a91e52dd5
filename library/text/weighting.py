"""Prompt weights in A1111's attention syntax (``--weighted_captions``): parsing, per-token weights, rescaling.

``(tag)`` multiplies the weight of ``tag`` by 1.1, ``[tag]`` divides it by 1.1, ``(tag:1.3)`` sets a factor,
nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, brackets left open apply to the
rest of the prompt, and a stray closing bracket is plain text. ``BREAK`` (upper case, outside brackets) ends the
current 75-token chunk early. The rules and outputs follow A1111's ``modules/prompt_parser.py``, which sd-scripts
copies for its weighted captions.
"""

from __future__ import annotations

import logging
import re

import torch
from transformers import CLIPTokenizer

from library.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)

# One match per syntax element, tried in this order: an escaped bracket or backslash, a lone backslash (dropped),
# an opening bracket, an explicit weight closing a round bracket, a closing bracket, a run of plain text, a colon.
_ELEMENT = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | [(\[]
    | :(?P<weight>[+-]?[.\d]+)\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)

logger = logging.getLogger(__name__)


def _weight_value(text: str, prompt: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(
            f"weighted caption {prompt!r}: '{text}' in '(…:{text})' is not a number; "
            "write a weight like (word:1.2) or escape the bracket as \\("
        ) from None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs exactly as A1111 does; ``BREAK`` appears as ``("BREAK", -1.0)``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ELEMENT.finditer(text):
        element = match.group(0)
        weight = match.group("weight")
        if element.startswith("\\"):
            runs.append([element[1:], 1.0])
        elif element == "(":
            open_round.append(len(runs))
        elif element == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight_value(weight, text))
        elif element == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif element == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(element)):
                if i > 0:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not runs:
        runs = [["", 1.0]]

    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, run_weight) for run_text, run_weight in merged]


def _is_break(run: tuple[str, float]) -> bool:
    """A1111 treats BREAK as a chunk break only at weight -1, i.e. outside any bracket."""
    return run[0] == BREAK[0] and run[1] == BREAK[1]


def _chunked_tokens(
    runs: list[tuple[list[int], float] | None], chunk_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """Lay tokens out in chunks of ``chunk_tokens``; ``None`` (a BREAK) closes the current chunk, even an empty one."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for run in runs:
        if run is None:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in run[0]:
            if len(ids) == chunk_tokens:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(run[1])
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _flatten_chunks(
    chunks: list[tuple[list[int], list[float]]], chunk_tokens: int, eos: int, pad: int
) -> tuple[list[int], list[float]]:
    """Join chunks into one token stream; a chunk closed early by BREAK ends with EOS and padding, like a prompt."""
    ids: list[int] = []
    weights: list[float] = []
    for index, (chunk_ids, chunk_weights) in enumerate(chunks):
        ids += chunk_ids
        weights += chunk_weights
        fill = chunk_tokens - len(chunk_ids)
        if index < len(chunks) - 1 and fill > 0:
            ids += [eos] + [pad] * (fill - 1)
            weights += [1.0] * fill
    return ids, weights


def tokenize_weighted(
    tokenizer: CLIPTokenizer, prompts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights of weighted prompts, as ``(B, max_length)`` tensors.

    The ids have the layout of ``tokenizer(prompt, padding="max_length", truncation=True, max_length=max_length)``:
    BOS, up to ``max_length - 2`` tokens, EOS, then the tokenizer's pad token; text past the last chunk is dropped.
    Each weighted run is tokenized on its own (as A1111 and sd-scripts do), so a prompt whose weights are all 1.0
    gives the plain prompt's ids. BOS, EOS and padding have weight 1.0.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    chunk_tokens = tokenizer.model_max_length - 2
    content = max_length - 2
    n_chunks = content // chunk_tokens
    parsed = [parse_prompt_attention(prompt) for prompt in prompts]
    texts = [run[0] for runs in parsed for run in runs if not _is_break(run)]
    token_lists = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])

    all_ids, all_weights = [], []
    truncated = 0
    for runs in parsed:
        token_runs = [None if _is_break(run) else (next(token_lists), run[1]) for run in runs]
        chunks = _chunked_tokens(token_runs, chunk_tokens)
        truncated += len(chunks) > n_chunks
        ids, weights = _flatten_chunks(chunks[:n_chunks], chunk_tokens, eos, pad)
        fill = content - len(ids)
        all_ids.append([bos] + ids + [eos] + [pad] * fill)
        all_weights.append([1.0] + weights + [1.0] * (fill + 1))
    if truncated:
        logger.warning(f"{truncated} weighted prompt(s) did not fit in {content} tokens and were cut off")
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32)


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position's state by its weight, then rescale each prompt so its mean is what it was.

    This is sd-scripts' rule (``get_weighted_text_embeddings``): means over positions and channels are taken in
    float32 and cast back to the states' dtype. A prompt whose weighted mean is exactly 0 is not rescaled (sd-scripts
    would divide by zero). ``hidden_states`` is (B, L, C), ``weights`` (B, L).
    """
    weights = weights.to(device=hidden_states.device, dtype=hidden_states.dtype)
    previous_mean = hidden_states.float().mean(dim=(-2, -1)).to(hidden_states.dtype)
    weighted = hidden_states * weights.unsqueeze(-1)
    current_mean = weighted.float().mean(dim=(-2, -1)).to(hidden_states.dtype)
    scale = torch.where(current_mean == 0, torch.ones_like(current_mean), previous_mean / current_mean)
    return weighted * scale[:, None, None]
