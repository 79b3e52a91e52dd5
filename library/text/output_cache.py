"""Text-encoder output caching (sd-scripts' ``--cache_text_encoder_outputs`` and ``…_to_disk``), for any family.

Before training, every image's caption is encoded once without gradients by the family's ``TextEncoding`` (with
placeholder size entries, ``family.size_batch``); during training ``CachedTextEncoding`` serves those results. Only
what depends on the caption alone is cached: an ``OutputLayout`` names those tensors (SDXL: both encoders' hidden
states and the pooled output), and the family's ``finish(conditioning, batch)`` adds what depends on the batch
(SDXL's size ``time_ids``) at every step; for every batch ``finish(layout.join(rows), batch)`` must equal
``encode(text_encoders, tokenizers, captions, batch)``.

Disk format: ``<stem>_te_outputs.npz`` beside each image, with the layout's arrays for that image (one row, no batch
axis; for SDXL sd-scripts' ``hidden_state1``, ``hidden_state2`` and ``pool2``). Unlike sd-scripts we add
``caption`` and ``cache_key`` (a JSON naming the caption's sha256 and the encoder id: text-encoder weights,
tokenizers and encoding settings), so a file is reused only while its caption and encoders are unchanged; an edited
caption file is re-encoded. Files are written atomically (``library.io.atomic_path``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from tqdm import tqdm

from library.dataset.captions import changing_caption_key, fixed_caption
from library.dataset.types import DatasetConfig
from library.errors import UserError
from library.io import atomic_path
from library.models.family import Conditioning, TextEncoding, size_batch

if TYPE_CHECKING:
    from library.dataset.loader import TrainDataset

logger = logging.getLogger("sdtrain.text")

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"  # sd-scripts' SdxlTextEncoderOutputsCachingStrategy
KEY_VERSION = 1

Finish = Callable[[Conditioning, Mapping[str, Any] | None], Conditioning]
Row = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TextOutputCacheSettings:
    """``--cache_text_encoder_outputs`` and ``--cache_text_encoder_outputs_to_disk`` (which implies the first)."""

    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False

    @property
    def enabled(self) -> bool:
        return self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk

    @property
    def flag(self) -> str:
        """The flag messages name."""
        if self.cache_text_encoder_outputs_to_disk:
            return "--cache_text_encoder_outputs_to_disk"
        return "--cache_text_encoder_outputs"


@dataclass(frozen=True)
class OutputLayout:
    """Which parts of a caption's ``Conditioning`` are cached, under which array names.

    ``hidden``: (name, width) parts of ``hidden_states`` along its last axis, in order (width 0: the rest).
    ``extras``: (name, key path into ``unet_kwargs``) of further caption-only tensors. Anything else in
    ``unet_kwargs`` is not cached: ``finish`` adds it per batch. SDXL: ``hidden=(("hidden_state1", 768),
    ("hidden_state2", 1280))``, ``extras=(("pool2", ("added_cond_kwargs", "text_embeds")),)``, which is
    ``OutputLayout.per_encoder(text_encoders, extras=family.text_output_extras())``.
    """

    hidden: tuple[tuple[str, int], ...] = (("hidden_state", 0),)
    extras: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def split(self, conditioning: Conditioning) -> list[Row]:
        """One dict of named CPU tensors (no batch axis) per row of ``conditioning``."""
        states = conditioning.hidden_states
        parts: dict[str, torch.Tensor] = {}
        start = 0
        for name, width in self.hidden:
            end = states.shape[-1] if width == 0 else start + width
            parts[name] = states[..., start:end]
            start = end
        if start != states.shape[-1]:
            raise ValueError(f"layout widths cover {start} of the hidden states' {states.shape[-1]} features")
        for name, path in self.extras:
            value: Any = conditioning.unet_kwargs
            for key in path:
                value = value[key]
            parts[name] = value
        return [{k: v[i].detach().cpu().clone() for k, v in parts.items()} for i in range(states.shape[0])]

    def join(self, rows: Sequence[Row]) -> Conditioning:
        """The batch ``Conditioning`` of these rows (the inverse of ``split``)."""
        stacked = {name: torch.stack([row[name] for row in rows]) for name in self.names}
        states = torch.cat([stacked[name] for name, _ in self.hidden], dim=-1)
        kwargs: dict[str, Any] = {}
        for name, path in self.extras:
            node = kwargs
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = stacked[name]
        return Conditioning(states, kwargs)

    @classmethod
    def per_encoder(
        cls, text_encoders: Sequence[torch.nn.Module], extras: tuple[tuple[str, tuple[str, ...]], ...] = ()
    ) -> OutputLayout:
        """Hidden states joined from each encoder's in order, named as sd-scripts does: ``hidden_state`` for one
        encoder, ``hidden_state1``, ``hidden_state2``, … for several (SDXL, with ``extras`` naming ``pool2``)."""
        widths = [extract_model_from_parallel(m).config.hidden_size for m in text_encoders]
        if len(widths) == 1:
            return cls((("hidden_state", 0),), extras)
        return cls(tuple((f"hidden_state{i}", w) for i, w in enumerate(widths, 1)), extras)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.hidden) + tuple(name for name, _ in self.extras)


def check_text_output_cache(
    settings: TextOutputCacheSettings,
    datasets: Sequence[DatasetConfig],
    *,
    text_encoder_trained_by: str | None = None,
) -> None:
    """Refuse what makes cached outputs wrong: a trained text encoder (``text_encoder_trained_by`` names the flag,
    e.g. ``--train_text_encoder``) or captions that change between steps (sd-scripts refuses the same)."""
    if not settings.enabled:
        return
    flag = settings.flag
    if text_encoder_trained_by:
        raise UserError(
            f"{flag} cannot be combined with {text_encoder_trained_by}: a trained text encoder's outputs change "
            "every step; drop one of them"
        )
    for dataset in datasets:
        for subset in dataset.subsets:
            key = changing_caption_key(subset)
            if key is not None:
                raise UserError(
                    f"{subset.name}: --{key} cannot be combined with {flag} (the caption, and so the text-encoder "
                    f"output, changes between steps); turn off {key} or {flag}"
                )


def te_outputs_path(image_path: Path) -> Path:
    """sd-scripts' file name: ``<stem>_te_outputs.npz`` beside the image."""
    return image_path.with_name(image_path.stem + TE_OUTPUTS_SUFFIX)


def _tokenizer_id(tokenizer: Any) -> list[Any]:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return [type(tokenizer).__name__, len(tokenizer), tokenizer.model_max_length, special, digest]


def _weights_id(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def encoder_id(text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], settings_id: str) -> str:
    """Identifies everything but the caption that the outputs depend on: the text encoders' weights, the
    tokenizers (vocabulary with added tokens, special ids, length) and ``settings_id`` (family and encoding
    settings, e.g. ``f"{family.name}:{text_settings!r}"``)."""
    parts = [settings_id, [_tokenizer_id(t) for t in tokenizers], [_weights_id(m) for m in text_encoders]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def caption_key(caption: str, encoder: str) -> str:
    """The ``cache_key`` of one caption's outputs under encoder id ``encoder``."""
    return json.dumps(
        {"v": KEY_VERSION, "caption": hashlib.sha256(caption.encode()).hexdigest(), "encoder": encoder},
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class CachedTextEncoding:
    """A ``TextEncoding`` serving cached outputs: ``store`` maps a caption to its row (memory) or npz file (disk).

    A caption not in the store (a ``--dataset_class`` making other captions) is encoded live without gradients.
    ``finish`` adds the batch-dependent conditioning (None: nothing to add)."""

    store: Mapping[str, Row | Path]
    layout: OutputLayout
    encode: TextEncoding
    finish: Finish | None = None
    misses: set[str] = field(default_factory=set, compare=False)

    def __call__(
        self,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        captions: list[str],
        batch: Mapping[str, Any] | None = None,
    ) -> Conditioning:
        """The cached conditioning of ``captions``, completed by ``finish`` for ``batch``."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.store]
        live: dict[str, Row] = {}
        if missing:
            new = [c for c in missing if c not in self.misses]
            if new:
                self.misses.update(new)
                logger.warning("%d caption(s) were not in the text-encoder output cache; encoding them live", len(new))
            with torch.no_grad():
                encoded = self.encode(text_encoders, tokenizers, missing, _placeholder_sizes(len(missing)))
            live = dict(zip(missing, self.layout.split(encoded)))
        rows = [live[c] if c in live else _load_row(self.store[c], self.layout) for c in captions]
        conditioning = self.layout.join(rows)
        return self.finish(conditioning, batch) if self.finish is not None else conditioning


def _placeholder_sizes(count: int) -> dict[str, Any]:
    """Size entries for encoding captions outside a batch; what depends on them is not cached (see the layout)."""
    return size_batch(64, 64, count)


def _load_row(entry: Row | Path, layout: OutputLayout) -> Row:
    if not isinstance(entry, Path):
        return entry
    try:
        with np.load(entry, allow_pickle=False) as z:
            return {name: torch.from_numpy(z[name].copy()) for name in layout.names}
    except Exception as e:
        raise UserError(
            f"{entry}: text-encoder output cache file unreadable ({type(e).__name__}); delete it and run again"
        ) from e


def _valid(path: Path, key: str, layout: OutputLayout, skip_check: bool) -> bool:
    if not path.is_file():
        return False
    if skip_check:
        return True
    try:
        with np.load(path, allow_pickle=False) as z:
            return "cache_key" in z.files and str(z["cache_key"]) == key and set(layout.names) <= set(z.files)
    except Exception as e:
        logger.warning("%s: text-encoder output cache file unreadable (%s); re-encoding it", path, type(e).__name__)
        return False


def _write(path: Path, row: Row, caption: str, key: str) -> None:
    arrays = {name: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for name, t in row.items()}
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, caption=np.array(caption), cache_key=np.array(key))


def _encode_all(
    captions: Iterable[str],
    encode: TextEncoding,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    layout: OutputLayout,
    batch_size: int,
    progress: bool,
) -> dict[str, Row]:
    unique = list(dict.fromkeys(captions))
    rows: dict[str, Row] = {}
    with torch.no_grad(), tqdm(total=len(unique), desc="caching text encoder outputs", disable=not progress) as bar:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            rows.update(
                zip(chunk, layout.split(encode(text_encoders, tokenizers, chunk, _placeholder_sizes(len(chunk)))))
            )
            bar.update(len(chunk))
    return rows


def image_captions(dataset: TrainDataset) -> list[tuple[Path, str]]:
    """(image path, the caption it is always trained with) for every record of ``dataset``."""
    return [
        (record.path, fixed_caption(record, config.subsets[record.subset_index]))
        for config, records in zip(dataset.datasets, dataset.records)
        for record in records
    ]


def cache_text_outputs(
    dataset: TrainDataset,
    encode: TextEncoding,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    *,
    settings_id: str,
    to_disk: bool,
    layout: OutputLayout = OutputLayout(),
    finish: Finish | None = None,
    batch_size: int = 8,
    skip_check: bool = False,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] | None = None,
) -> CachedTextEncoding:
    """Encode every image's caption once (``encode`` with ``batch=None``, no gradients, ``batch_size`` captions a
    call) and return the ``TextEncoding`` that serves them; call ``check_text_output_cache`` first.

    ``to_disk`` writes/reuses ``<stem>_te_outputs.npz`` files (``skip_check``: trust any existing file, as
    sd-scripts' ``--skip_cache_check``); several processes each write their share, wait at ``barrier``, then read
    all. ``settings_id`` names the family and encoding settings (see ``encoder_id``)."""
    pairs = image_captions(dataset)
    if not to_disk:
        store = _encode_all((c for _, c in pairs), encode, text_encoders, tokenizers, layout, batch_size, progress)
        logger.info("text encoder outputs: %d captions encoded for %d images", len(store), len(pairs))
        return CachedTextEncoding(store, layout, encode, finish)
    encoder = encoder_id(text_encoders, tokenizers, settings_id)
    if num_processes > 1:
        if barrier is None:
            raise ValueError("caching text-encoder outputs to disk from several processes needs a barrier")
        mine = pairs[process_index::num_processes]
        _fill_disk(mine, encode, text_encoders, tokenizers, layout, encoder, batch_size, skip_check, progress)
        barrier()
    paths = _fill_disk(pairs, encode, text_encoders, tokenizers, layout, encoder, batch_size, skip_check, progress)
    return CachedTextEncoding(paths, layout, encode, finish)


def _fill_disk(
    pairs: Sequence[tuple[Path, str]],
    encode: TextEncoding,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    layout: OutputLayout,
    encoder: str,
    batch_size: int,
    skip_check: bool,
    progress: bool,
) -> dict[str, Path]:
    """Write every stale or missing file of ``pairs``; the file to read each caption from."""
    for image, _ in pairs:
        if te_outputs_path(image).is_dir():
            raise UserError(
                f"{te_outputs_path(image)}: a folder is where this text-encoder output cache file should be written; "
                "remove or rename it and rerun"
            )
    stale = [
        (image, c)
        for image, c in pairs
        if not _valid(te_outputs_path(image), caption_key(c, encoder), layout, skip_check)
    ]
    rows = _encode_all((c for _, c in stale), encode, text_encoders, tokenizers, layout, batch_size, progress)
    for image, caption in stale:
        _write(te_outputs_path(image), rows[caption], caption, caption_key(caption, encoder))
    logger.info("text encoder outputs: %d file(s) written, %d reused from disk", len(stale), len(pairs) - len(stale))
    paths: dict[str, Path] = {}
    for image, caption in pairs:
        paths.setdefault(caption, te_outputs_path(image))
    return paths
