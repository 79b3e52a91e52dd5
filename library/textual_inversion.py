"""Textual inversion tokens and files with sd-scripts' semantics.

A token string ``tok`` with N vectors becomes the tokens ``tok, tok1, … tok<N-1>`` added to the tokenizer, with new
rows at the end of the text encoder's token embedding, initialised from the ``--init_word`` token embeddings. In
captions and sample prompts ``tok`` is expanded to ``tok tok1 …``. XTI (P+) adds ``<t>_<layer>`` tokens, one set per
UNet cross-attention layer (see ``library.xti``).

Files: sd-scripts writes ``{"emb_params": (N, width)}`` (safetensors, or ``torch.save`` for ``.pt``/``.ckpt``),
which A1111, ComfyUI and diffusers' ``load_textual_inversion(path, token=…)`` load; XTI files hold one
``(N, width)`` tensor per layer name (``IN01`` … ``OUT11``). Reading also accepts A1111's ``string_to_param``
layout and diffusers' one-token ``{token: tensor}`` files. An SDXL embedding is one file holding both encoders'
vectors, ``{"clip_l": (N, 768), "clip_g": (N, 1280)}`` (sd-scripts' sdxl_train_textual_inversion.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.io import atomic_save, load_pickle_checkpoint, load_safetensors

EMBEDDING_KEY = "emb_params"
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text encoder 1 (CLIP ViT-L), text encoder 2 (OpenCLIP ViT-bigG)

XTI_LAYERS = (
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "MID",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def token_strings(token_string: str, num_vectors: int) -> list[str]:
    """``tok, tok1, … tok<N-1>``: the tokens one embedding of ``num_vectors`` vectors occupies (sd-scripts)."""
    return [token_string] + [f"{token_string}{i + 1}" for i in range(num_vectors - 1)]


def xti_token_strings(strings: Sequence[str], layer: str) -> list[str]:
    """The tokens of one XTI layer: ``<t>_<layer>`` for each of the embedding's tokens."""
    return [f"{t}_{layer}" for t in strings]


def expand_text(text: str, token_string: str, tokens: Sequence[str]) -> str:
    """Replace every occurrence of ``token_string`` by all its tokens (``tok`` → ``tok tok1 tok2``), as sd-scripts
    does with its caption and prompt replacement (a plain substring replacement)."""
    return text.replace(token_string, " ".join(tokens))


def pick_template(templates: Sequence[str], token_string: str, rng: random.Random) -> str:
    """One template caption with the (unexpanded) token string, chosen with ``rng``."""
    return rng.choice(list(templates)).format(token_string)


def init_token_ids(tokenizer: Any, init_word: str | None) -> list[int] | None:
    """The token ids of ``--init_word`` (None without one); a word the tokenizer turns into nothing is an error."""
    if init_word is None:
        return None
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not ids:
        raise UserError(f"--init_word {init_word!r}: the tokenizer gives no tokens for it; use a real word")
    return list(ids)


@dataclass(frozen=True)
class AddedTokens:
    """Tokens added to a tokenizer and the matching new embedding rows (ids are contiguous, at the end)."""

    strings: tuple[str, ...]
    ids: tuple[int, ...]

    @property
    def first_id(self) -> int:
        return self.ids[0]


def add_tokens(tokenizer: Any, text_encoder: torch.nn.Module, strings: Sequence[str], flag: str) -> AddedTokens:
    """Add ``strings`` as new tokens and grow the text encoder's token embedding to match.

    Every string must be new to the tokenizer (sd-scripts' rule); ``flag`` names the option to change otherwise.
    The new rows keep the embedding's default initialisation until :func:`init_rows` sets them.
    """
    vocab = tokenizer.get_vocab()
    existing = [s for s in strings if s in vocab]
    if existing:
        raise UserError(f"{flag}: the tokenizer already has the token {existing[0]!r}; choose a string it lacks")
    added = tokenizer.add_tokens(list(strings))
    if added != len(strings):
        raise UserError(f"{flag}: only {added} of the {len(strings)} tokens {list(strings)} could be added")
    ids = tuple(tokenizer.convert_tokens_to_ids(list(strings)))
    if list(ids) != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != len(tokenizer) - 1:
        raise UserError(f"{flag}: the added tokens got ids {list(ids)}, not the last ids of the tokenizer")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return AddedTokens(tuple(strings), ids)


def add_tokens_to_all(
    tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], strings: Sequence[str], flag: str
) -> list[AddedTokens]:
    """:func:`add_tokens` for every (tokenizer, text encoder) pair, in order; a token that any tokenizer already has
    is refused before any is changed (SDXL's two tokenizers must both get the same new tokens)."""
    for i, tokenizer in enumerate(tokenizers):
        vocab = tokenizer.get_vocab()
        existing = [s for s in strings if s in vocab]
        if existing:
            which = f"tokenizer {i + 1}" if len(tokenizers) > 1 else "the tokenizer"
            raise UserError(f"{flag}: {which} already has the token {existing[0]!r}; choose a string it lacks")
    return [add_tokens(tok, encoder, strings, flag) for tok, encoder in zip(tokenizers, text_encoders)]


def init_rows(weight: torch.Tensor, ids: Sequence[int], init_ids: Sequence[int], num_vectors: int) -> None:
    """Vector ``v`` of an embedding takes the row of init token ``v mod len(init_ids)`` (sd-scripts repeats or
    truncates the init word); ``ids`` may hold several embeddings of ``num_vectors`` rows each (XTI layers)."""
    with torch.no_grad():
        for k, token_id in enumerate(ids):
            weight[token_id] = weight[init_ids[(k % num_vectors) % len(init_ids)]]


def read_embedding_file(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file: safetensors, sd-scripts' ``.pt`` dict, or A1111's ``string_to_param``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    data = load_pickle_checkpoint(path, allow_unsafe_pickle)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not an embedding file (expected a dict of tensors, got {type(data).__name__})")
    if "string_to_param" in data:
        data = dict(getattr(data["string_to_param"], "_parameters", data["string_to_param"]))
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors; expected a textual inversion embedding")
    return tensors


def load_embedding(path: str | Path, allow_unsafe_pickle: bool = False) -> torch.Tensor:
    """One embedding as ``(num_vectors, width)`` from any of the single-embedding layouts."""
    tensors = read_embedding_file(path, allow_unsafe_pickle)
    if EMBEDDING_KEY in tensors:
        emb = tensors[EMBEDDING_KEY]
    elif any(key in tensors for key in SDXL_EMBEDDING_KEYS):
        raise UserError(f"{path}: an SDXL embedding (clip_l/clip_g); use it with an SDXL model and its scripts")
    elif len(tensors) == 1:
        emb = next(iter(tensors.values()))
    else:
        names = ", ".join(sorted(tensors)[:4])
        raise UserError(f"{path}: holds {len(tensors)} tensors ({names}…), not one embedding; is it an XTI file?")
    return emb.unsqueeze(0) if emb.dim() == 1 else emb


def load_xti_embeddings(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """An XTI file as ``{layer: (num_vectors, width)}`` for the 16 layers of :data:`XTI_LAYERS`."""
    tensors = read_embedding_file(path, allow_unsafe_pickle)
    missing = [layer for layer in XTI_LAYERS if layer not in tensors]
    if missing:
        raise UserError(f"{path}: not an XTI embedding (no tensor for layer(s) {', '.join(missing[:3])})")
    return {layer: tensors[layer] if tensors[layer].dim() == 2 else tensors[layer].unsqueeze(0) for layer in XTI_LAYERS}


def save_embedding_file(
    path: str | Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, metadata: dict[str, str] | None
) -> None:
    """Write ``tensors`` atomically: safetensors (with ``metadata``) for ``.safetensors``, else ``torch.save``."""
    path = Path(path)
    clean = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    if dtype is not None:
        clean = {k: v.to(dtype) for k, v in clean.items()}
    if path.suffix == ".safetensors":
        atomic_save(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata or None))
    else:
        atomic_save(path, lambda tmp: torch.save(clean, tmp))


def save_sdxl_embedding(
    path: str | Path,
    embeddings: Sequence[torch.Tensor],
    dtype: torch.dtype | None,
    metadata: dict[str, str] | None,
) -> None:
    """Write an SDXL embedding as sd-scripts does: ``clip_l`` and ``clip_g``, ``(N, width)`` each, in one file.

    ``embeddings`` are the two text encoders' new rows in encoder order; both must hold the same N vectors.
    """
    if len(embeddings) != len(SDXL_EMBEDDING_KEYS) or any(e.dim() != 2 for e in embeddings):
        raise ValueError(f"an SDXL embedding is two (num_vectors, width) tensors, got {[e.shape for e in embeddings]}")
    if embeddings[0].shape[0] != embeddings[1].shape[0]:
        raise ValueError(f"clip_l and clip_g need the same number of vectors: {[e.shape for e in embeddings]}")
    save_embedding_file(path, dict(zip(SDXL_EMBEDDING_KEYS, embeddings)), dtype, metadata)


def load_sdxl_embedding(
    path: str | Path, widths: Sequence[int] | None = None, allow_unsafe_pickle: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """An SDXL embedding as ``(clip_l, clip_g)``, ``(N, width)`` each; ``widths`` (the encoders' hidden sizes)
    are checked when given. SD 1.x/2.x files (``emb_params``) and files lacking either tensor are refused."""
    tensors = read_embedding_file(path, allow_unsafe_pickle)
    missing = [key for key in SDXL_EMBEDDING_KEYS if key not in tensors]
    if len(missing) == len(SDXL_EMBEDDING_KEYS):
        kind = "an SD 1.x/2.x embedding (emb_params)" if EMBEDDING_KEY in tensors else f"tensors {sorted(tensors)[:3]}"
        raise UserError(f"{path}: holds {kind}, not an SDXL one (clip_l + clip_g); use an embedding made for SDXL")
    if missing:
        raise UserError(f"{path}: an incomplete SDXL embedding (no {missing[0]} tensor); it needs clip_l and clip_g")
    pair = tuple(t.unsqueeze(0) if t.dim() == 1 else t for t in (tensors[k] for k in SDXL_EMBEDDING_KEYS))
    if pair[0].shape[0] != pair[1].shape[0]:
        n_l, n_g = pair[0].shape[0], pair[1].shape[0]
        raise UserError(f"{path}: clip_l has {n_l} vectors but clip_g {n_g}; an SDXL embedding needs the same count")
    if widths is not None:
        for key, tensor, width in zip(SDXL_EMBEDDING_KEYS, pair, widths):
            if tensor.shape[-1] != width:
                raise UserError(
                    f"{path}: {key} vectors are {tensor.shape[-1]} wide but the text encoder's are {width}; "
                    "the embedding is for another model"
                )
    return pair
