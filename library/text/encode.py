"""Prompts to text-encoder states with sd-scripts' semantics: long prompts in 75-token chunks, clip skip, weights.

``--max_token_length 150|225`` tokenizes a prompt to ``max_token_length + 2`` ids (BOS, tokens, EOS, padding) and cuts
it into 2 or 3 chunks of 75 tokens, each wrapped as ``BOS … EOS`` so CLIP sees 77 ids. Each chunk is encoded on its
own; the states are joined back as the first chunk's BOS state, every chunk's 75 middle states and the last chunk's
final state: 77, 152 or 227 positions. SD2 tokenizers pad with ``!`` (id 0) and get sd-scripts' two fixes: a chunk
cut in the middle of the prompt ends with EOS, and a chunk holding only padding starts ``BOS EOS``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from library.errors import UserError
from library.text.tokenizer import MAX_LENGTH
from library.text.weighting import apply_token_weights, tokenize_weighted

CHUNK_TOKENS = MAX_LENGTH - 2
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextEncodingSettings:
    """How captions are encoded (``--max_token_length``, ``--clip_skip``, ``--weighted_captions``)."""

    max_token_length: int | None = None
    clip_skip: int | None = None
    weighted_captions: bool = False


def token_length(max_token_length: int | None) -> int:
    """The number of prompt tokens kept for ``--max_token_length`` (None means 75)."""
    if max_token_length is None:
        return CHUNK_TOKENS
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length {max_token_length} is not supported; use 75, 150 or 225")
    return max_token_length


def _pad_id(tokenizer: CLIPTokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _check_tokenizer(tokenizer: CLIPTokenizer, v2: bool) -> None:
    """SD1 pads with EOS, SD2 with ``!``: a mismatch would silently give ids sd-scripts never trained on."""
    if tokenizer.model_max_length != MAX_LENGTH:
        raise UserError(
            f"the tokenizer's model_max_length is {tokenizer.model_max_length}, SD 1.x/2.x need {MAX_LENGTH}; "
            "load the tokenizer with model_max_length=77"
        )
    pads_with_eos = _pad_id(tokenizer) == tokenizer.eos_token_id
    if v2 == pads_with_eos:
        expected = "'!' (SD2)" if v2 else "<|endoftext|> (SD1)"
        raise UserError(
            f"--v2 is {'set' if v2 else 'not set'} but the tokenizer does not pad with {expected}; "
            "check --v2 against the model, or use library.text.tokenizer.load_packaged_tokenizer(v2)"
        )


def split_into_chunks(full_ids: torch.Tensor, tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Cut ``(B, n*75 + 2)`` ids (BOS, tokens, EOS, padding) into ``(B, n, 77)`` chunks the way sd-scripts does.

    Chunk ``c`` is BOS, tokens ``75c+1 … 75c+75`` and the sequence's last id. With pad == EOS (SD1) that is all;
    otherwise (SD2) a chunk whose second-to-last id is a real token ends with EOS, and one that starts with padding
    gets EOS after BOS. Both fixes leave SD1 ids unchanged, so they are applied regardless.
    """
    batch, length = full_ids.shape
    n_chunks = (length - 2) // CHUNK_TOKENS
    middle = full_ids[:, 1:-1].reshape(batch, n_chunks, CHUNK_TOKENS)
    bos = full_ids[:, :1, None].expand(batch, n_chunks, 1)
    last = full_ids[:, -1:, None].expand(batch, n_chunks, 1)
    chunks = torch.cat([bos, middle, last], dim=-1)
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    before_last = chunks[..., -2]
    cut_mid_prompt = (before_last != eos) & (before_last != pad)
    chunks[..., -1] = torch.where(cut_mid_prompt, eos, chunks[..., -1])
    chunks[..., 1] = torch.where(chunks[..., 1] == pad, eos, chunks[..., 1])
    return chunks


def _split_weights(full_weights: torch.Tensor) -> torch.Tensor:
    """``(B, n*75 + 2)`` weights to ``(B, n, 77)``: chunk tokens keep theirs, the BOS/EOS ends get 1.0."""
    batch, length = full_weights.shape
    n_chunks = (length - 2) // CHUNK_TOKENS
    middle = full_weights[:, 1:-1].reshape(batch, n_chunks, CHUNK_TOKENS)
    ends = middle.new_ones(batch, n_chunks, 1)
    return torch.cat([ends, middle, ends], dim=-1)


def tokenize_prompts(
    tokenizer: CLIPTokenizer, prompts: list[str], max_token_length: int | None = None, v2: bool = False
) -> torch.Tensor:
    """Token ids of plain prompts as ``(B, n_chunks, 77)`` with n_chunks = 1, 2 or 3 (``--max_token_length``)."""
    _check_tokenizer(tokenizer, v2)
    max_length = token_length(max_token_length) + 2
    full_ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
    return split_into_chunks(full_ids, tokenizer)


def tokenize_weighted_prompts(
    tokenizer: CLIPTokenizer, prompts: list[str], max_token_length: int | None = None, v2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights of A1111-syntax prompts, both ``(B, n_chunks, 77)``, for ``encode_token_ids``."""
    _check_tokenizer(tokenizer, v2)
    full_ids, full_weights = tokenize_weighted(tokenizer, list(prompts), token_length(max_token_length) + 2)
    return split_into_chunks(full_ids, tokenizer), _split_weights(full_weights)


class TokenCache:
    """Chunked token ids (and weights) per prompt for one call site, so captions seen before are not re-tokenized.

    A bounded LRU of ``max_prompts`` prompts. It holds results for one tokenizer and one set of options: a call with
    another tokenizer object, another vocabulary size (tokens added) or other options starts it afresh. Each prompt
    is tokenized on its own row, so the ids are exactly those of tokenizing the whole batch at once.
    """

    def __init__(self, max_prompts: int = 4096) -> None:
        self.max_prompts = max_prompts
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._tokenizer: CLIPTokenizer | None = None
        self._options: tuple = ()

    def __len__(self) -> int:
        return len(self._entries)

    def tokens(
        self,
        tokenizer: CLIPTokenizer,
        prompts: list[str],
        max_token_length: int | None,
        v2: bool,
        weighted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, n, 77)`` ids and, when ``weighted``, weights of ``prompts``, tokenizing only the ones not cached."""
        options = (len(tokenizer), max_token_length, v2, weighted)
        if tokenizer is not self._tokenizer or options != self._options:
            self._entries.clear()
            self._tokenizer, self._options = tokenizer, options
        missing = [p for p in dict.fromkeys(prompts) if p not in self._entries]
        if missing:
            if weighted:
                ids, weights = tokenize_weighted_prompts(tokenizer, missing, max_token_length, v2)
            else:
                ids, weights = tokenize_prompts(tokenizer, missing, max_token_length, v2), None
            for row, prompt in enumerate(missing):
                self._entries[prompt] = (ids[row].clone(), None if weights is None else weights[row].clone())
        rows = []
        for prompt in prompts:
            self._entries.move_to_end(prompt)
            rows.append(self._entries[prompt])
        while len(self._entries) > self.max_prompts:
            self._entries.popitem(last=False)
        ids = torch.stack([row[0] for row in rows])
        return ids, torch.stack([row[1] for row in rows]) if weighted else None


def merge_chunks(chunked: torch.Tensor) -> torch.Tensor:
    """``(B, n, 77, …)`` per-chunk values to ``(B, n*75 + 2, …)``: first BOS, each chunk's middle 75, last end."""
    batch, n_chunks = chunked.shape[:2]
    rest = chunked.shape[3:]
    first = chunked[:, 0, :1]
    middle = chunked[:, :, 1:-1].reshape(batch, n_chunks * CHUNK_TOKENS, *rest)
    last = chunked[:, -1, -1:]
    return torch.cat([first, middle, last], dim=1)


def _unwrap(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text model inside DDP / accelerate wrappers and transformers 4's ``text_model`` attribute."""
    module = getattr(text_encoder, "module", text_encoder)
    return getattr(module, "text_model", module)


def _num_layers(text_encoder: torch.nn.Module) -> int:
    return len(_unwrap(text_encoder).encoder.layers)


def run_text_encoder(text_encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """States of ``(N, L)`` ids: the last hidden state, or with clip skip N the N-th from last layer output passed
    through the final layer norm (as sd-scripts and A1111 do)."""
    if clip_skip is None or clip_skip == 1:
        return text_encoder(ids)[0]
    n_layers = _num_layers(text_encoder)
    if not 1 <= clip_skip <= n_layers:
        raise UserError(
            f"--clip_skip {clip_skip} is out of range for a text encoder of {n_layers} layers; use 1 to {n_layers}"
        )
    output = text_encoder(ids, output_hidden_states=True, return_dict=True)
    return _unwrap(text_encoder).final_layer_norm(output.hidden_states[-clip_skip])


def encode_token_ids(
    text_encoder: CLIPTextModel,
    ids: torch.Tensor,
    *,
    clip_skip: int | None = None,
    v2: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encoder states for chunked ids ``(B, n, 77)`` as ``(B, n*75 + 2, width)``; all chunks go through in one batch.

    ``ids`` of shape ``(B, L)`` with L <= 77 (one chunk, or ``--no_token_padding``) are encoded as they are.
    ``weights`` (same shape as ``ids``) apply sd-scripts' weighting with mean rescaling. ``v2`` does not change the
    result: sd-scripts joins SD2 chunks exactly like SD1 ones (its SD2 special case compares ids with a string and
    never applies). ``ids`` must be on the text encoder's device. Gradients flow, so the text encoder can be trained
    through this.
    """
    if ids.dim() == 2:
        states = run_text_encoder(text_encoder, ids, clip_skip)
        return states if weights is None else apply_token_weights(states, weights)
    if ids.dim() != 3 or ids.shape[-1] != MAX_LENGTH:
        raise ValueError(f"token ids must be (B, n_chunks, {MAX_LENGTH}) or (B, L), got {tuple(ids.shape)}")
    batch, n_chunks = ids.shape[:2]
    states = run_text_encoder(text_encoder, ids.reshape(batch * n_chunks, MAX_LENGTH), clip_skip)
    states = merge_chunks(states.reshape(batch, n_chunks, MAX_LENGTH, states.shape[-1]))
    if weights is None:
        return states
    return apply_token_weights(states, merge_chunks(weights.reshape(batch, n_chunks, MAX_LENGTH)))


def encode_prompts(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    *,
    max_token_length: int | None = None,
    clip_skip: int | None = None,
    weighted: bool = False,
    v2: bool = False,
    device: torch.device | str | None = None,
    cache: TokenCache | None = None,
) -> torch.Tensor:
    """Prompts to ``(B, 77 | 152 | 227, width)`` conditioning, the one call for training and sampling.

    ``weighted`` reads A1111's attention syntax (``--weighted_captions``); otherwise the text goes to the tokenizer
    as it is, as in sd-scripts. ``device`` defaults to the text encoder's. ``cache`` keeps the token ids of prompts
    seen before (the training loop's captions repeat every epoch); the result is the same with or without it.
    """
    if device is None:
        device = next(text_encoder.parameters()).device
    if cache is not None:
        ids, weights = cache.tokens(tokenizer, prompts, max_token_length, v2, weighted)
        weights = None if weights is None else weights.to(device)
        return encode_token_ids(text_encoder, ids.to(device), clip_skip=clip_skip, v2=v2, weights=weights)
    if weighted:
        ids, weights = tokenize_weighted_prompts(tokenizer, prompts, max_token_length, v2)
        return encode_token_ids(text_encoder, ids.to(device), clip_skip=clip_skip, v2=v2, weights=weights.to(device))
    ids = tokenize_prompts(tokenizer, prompts, max_token_length, v2)
    return encode_token_ids(text_encoder, ids.to(device), clip_skip=clip_skip, v2=v2)
