"""The recipe of ``train_textual_inversion.py`` (and ``_XTI``): train only new token embedding rows.

The base model stays frozen. New tokens are added to every tokenizer and their rows to each text encoder's token
embedding (see ``library.textual_inversion``); the whole embedding matrices are handed to the optimizer, as sd-scripts
does, and every other row is put back bit for bit after each optimizer step. SDXL's embedding holds both encoders'
vectors (``clip_l``, ``clip_g``). Captions and sample prompts have the token string expanded to all its tokens;
``--use_object_template`` / ``--use_style_template`` replace captions by sd-scripts' templates, chosen per sample from
the seed, epoch and batch so a resumed run sees the same captions.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from library.dataset.summary import DatasetSummary
from library.engine.parts import SampleRequest, TrainingParts
from library.engine.recipe import ParamGroups, Recipe
from library.errors import UserError
from library.models.components import Components
from library.models.family import Conditioning, TextEncoding
from library.models.save import save_dtype
from library.modelspec import modelspec_from_settings
from library.recipes.settings import TextualInversionSettings
from library.seeds import derive_seed
from library.textual_inversion import (
    EMBEDDING_KEY,
    SDXL_EMBEDDING_KEYS,
    XTI_LAYERS,
    AddedTokens,
    add_tokens_to_all,
    expand_text,
    init_rows,
    init_token_ids,
    load_embedding,
    load_sdxl_embedding,
    load_xti_embeddings,
    pick_template,
    save_embedding_file,
    save_sdxl_embedding,
    token_strings,
    xti_token_strings,
)

if TYPE_CHECKING:
    from library.sampling import SampleSettings

logger = logging.getLogger("sdtrain")


def check_token_in_captions(dataset: Any, token_string: str) -> None:
    """Refuse a dataset none of whose training captions (or class tokens, prefix, suffix) has ``token_string``."""
    total = with_token = 0
    for config, records in zip(dataset.datasets, dataset.records):
        for record in records:
            subset = config.subsets[record.subset_index]
            if subset.is_reg:
                continue
            total += 1
            texts = list(record.captions) or [subset.class_tokens or ""]
            texts += [subset.caption_prefix or "", subset.caption_suffix or ""]
            with_token += any(token_string in t for t in texts)
    if total and not with_token:
        raise UserError(
            f"--token_string {token_string!r}: no caption of the {total} training images contains it, so it would "
            "never be trained; put it in the captions (or class tokens), or use --use_object_template / "
            "--use_style_template"
        )
    if with_token < total:
        logger.warning(f"--token_string {token_string!r} appears in the captions of {with_token} of {total} images")


class TemplateCaptions:
    """A dataset whose captions are replaced by a template with the token string, picked per sample from
    (seed, epoch, batch, item) so workers and resumed runs pick the same ones."""

    def __init__(self, inner: Any, templates: tuple[str, ...], token_string: str):
        self.inner = inner
        self.templates = templates
        self.token_string = token_string

    def describe(self, summary: DatasetSummary) -> DatasetSummary:
        """The inner dataset's ``summary`` with a line saying which captions replace its own."""
        return summary.with_lines(f"captions: {len(self.templates)} templates with {self.token_string!r}")

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}:templates:{self.templates[0]}"

    def batch_plan(self, epoch: int) -> Any:
        return self.inner.batch_plan(epoch)

    def load_batch(self, plan: Any) -> dict[str, Any] | None:
        batch = self.inner.load_batch(plan)
        if batch is None:
            return None
        rngs = [
            random.Random(derive_seed(self.inner.seed, "template", plan.epoch, plan.index, n))
            for n in range(len(batch["captions"]))
        ]
        batch["captions"] = [pick_template(self.templates, self.token_string, rng) for rng in rngs]
        return batch


class TextualInversionRecipe(Recipe):
    """Train the embedding of ``--token_string`` (``--num_vectors_per_token`` vectors in every text encoder); with
    ``xti`` one embedding per UNet cross-attention layer (SD 1.x only)."""

    def __init__(self, settings: TextualInversionSettings, *, xti: bool = False):
        s = settings
        if not s.token_string:
            raise UserError("--token_string is required: the new word to train, e.g. --token_string mychar")
        if s.num_vectors_per_token < 1:
            raise UserError(f"--num_vectors_per_token {s.num_vectors_per_token}: must be 1 or more")
        self.settings = settings
        self.xti = xti
        self.strings = token_strings(s.token_string, s.num_vectors_per_token)
        self.save_dtype = save_dtype(s.save_precision)
        self.tokens: list[AddedTokens] = []
        self.token_embeddings: list[nn.Embedding] = []
        self.originals: list[torch.Tensor] = []
        self.components: Components | None = None

    @property
    def train_unet(self) -> bool:
        return False

    @property
    def train_text_encoder(self) -> bool:
        return True

    @property
    def embedding(self) -> nn.Embedding:
        """The trained token embedding of a one-encoder model (SD 1.x/2.x); SDXL has ``token_embeddings``."""
        if len(self.token_embeddings) != 1:
            raise ValueError(f"this model has {len(self.token_embeddings)} token embeddings; use token_embeddings")
        return self.token_embeddings[0]

    def layer_tokens(self, layer: str | None) -> list[str]:
        """The tokens that stand for the token string (in one XTI layer, or plain textual inversion's)."""
        return self.strings if layer is None else xti_token_strings(self.strings, layer)

    def setup(self, components: Components, device: torch.device, weight_dtype: torch.dtype) -> None:
        s, c = self.settings, components
        self.components = c
        if self.xti and c.family.name != "sd1":
            raise UserError(
                f"train_textual_inversion_XTI.py supports SD 1.x only, this model is {c.family.description}; "
                "use a SD 1.x model or train_textual_inversion.py"
            )
        if len(c.text_encoders) > len(SDXL_EMBEDDING_KEYS):
            raise UserError(f"textual inversion supports models with 1 or 2 text encoders, not {c.family.description}")
        layers = XTI_LAYERS if self.xti else (None,)
        strings = [t for layer in layers for t in self.layer_tokens(layer)]
        init_ids = [init_token_ids(tokenizer, s.init_word) for tokenizer in c.tokenizers]
        for i, ids in enumerate(init_ids):
            if ids is not None and 1 < len(ids) != s.num_vectors_per_token:
                logger.warning(
                    f"--init_word {s.init_word!r} has {len(ids)} tokens in tokenizer {i + 1} for "
                    f"{s.num_vectors_per_token} vectors; its tokens are repeated or truncated"
                )
        for encoder in c.text_encoders:
            encoder.to(dtype=torch.float32)
        self.tokens = add_tokens_to_all(c.tokenizers, c.text_encoders, strings, "--token_string")
        self.token_embeddings = [encoder.get_input_embeddings() for encoder in c.text_encoders]
        for embedding, added, ids in zip(self.token_embeddings, self.tokens, init_ids):
            if ids is not None:
                init_rows(embedding.weight.data, added.ids, ids, s.num_vectors_per_token)
        if s.weights:
            self._load_weights(s.weights)
        logger.info(f"added {len(strings)} tokens for {s.token_string!r}: ids {[t.ids[0] for t in self.tokens]}…")
        for embedding in self.token_embeddings:
            embedding.requires_grad_(True)
        self.originals = [embedding.weight.detach().clone() for embedding in self.token_embeddings]
        if self.xti:
            from library.xti import install_layer_conditioning

            install_layer_conditioning(c.unet)

    def _load_weights(self, path: str) -> None:
        """``--weights``: the new rows of every encoder from an embedding file of this model's layout."""
        n, unsafe = self.settings.num_vectors_per_token, self.settings.allow_unsafe_pickle
        weights = [embedding.weight.data for embedding in self.token_embeddings]
        widths = [weight.shape[1] for weight in weights]
        if len(weights) > 1:
            loaded = {None: load_sdxl_embedding(path, widths, unsafe)}
        elif self.xti:
            loaded = {layer: (emb,) for layer, emb in load_xti_embeddings(path, unsafe).items()}
        else:
            loaded = {None: (load_embedding(path, unsafe),)}
        for layer, embs in loaded.items():
            for i, (emb, weight, width) in enumerate(zip(embs, weights, widths)):
                if tuple(emb.shape) != (n, width):
                    raise UserError(
                        f"--weights {path}: embedding shape {tuple(emb.shape)}, this run needs ({n}, {width}); "
                        "check --num_vectors_per_token and the base model"
                    )
                ids = self.rows(layer, i)
                with torch.no_grad():
                    weight[ids[0] : ids[-1] + 1] = emb.to(weight.dtype)
        logger.info(f"loaded embedding weights from {path}")

    def rows(self, layer: str | None, encoder: int = 0) -> list[int]:
        """The embedding rows of one XTI layer's tokens (or all new rows for plain textual inversion) in the
        token embedding of text encoder ``encoder``."""
        ids = self.tokens[encoder].ids
        if layer is None:
            return list(ids)
        start = XTI_LAYERS.index(layer) * len(self.strings)
        return list(ids[start : start + len(self.strings)])

    def trainable_modules(self) -> list[nn.Module]:
        return list(self.token_embeddings)

    def param_groups(self) -> ParamGroups:
        """One group holding every encoder's token embedding, as sd-scripts hands them to its optimizer."""
        params = [embedding.weight for embedding in self.token_embeddings]
        return ParamGroups([{"params": params, "lr": self.settings.learning_rate}], ["textencoder"])

    def fingerprint(self) -> dict[str, Any]:
        readable = {"token_string": self.settings.token_string, "num_vectors": len(self.strings), "xti": self.xti}
        return {**readable, **super().fingerprint()}

    def after_optimizer_step(self, device: torch.device) -> dict[str, float]:
        """Put back every row but the new tokens' (the optimizer updates the whole matrices)."""
        with torch.no_grad():
            for embedding, original, added in zip(self.token_embeddings, self.originals, self.tokens):
                weight, first = embedding.weight, added.first_id
                weight[:first] = original[:first].to(device=weight.device, dtype=weight.dtype)
        return {}

    def embeddings(self) -> dict[str, torch.Tensor]:
        """What a save writes: ``{"emb_params": (N, width)}``, one ``(N, width)`` tensor per XTI layer, or SDXL's
        ``clip_l`` and ``clip_g``."""
        weights = [embedding.weight.detach() for embedding in self.token_embeddings]
        if len(weights) > 1:
            return {key: w[self.rows(None, i)].clone() for i, (key, w) in enumerate(zip(SDXL_EMBEDDING_KEYS, weights))}
        weight = self.embedding.weight.detach()
        if not self.xti:
            return {EMBEDDING_KEY: weight[self.rows(None)].clone()}
        return {layer: weight[self.rows(layer)].clone() for layer in XTI_LAYERS}

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        c = self.components
        metadata = None
        if not self.xti:
            metadata = modelspec_from_settings(
                self.settings.metadata, c.family, c.v_parameterization, lora=False, textual_inversion=True
            )
        embeddings = self.embeddings()
        if len(self.token_embeddings) > 1:
            save_sdxl_embedding(path, [embeddings[key] for key in SDXL_EMBEDDING_KEYS], self.save_dtype, metadata)
        else:
            save_embedding_file(path, embeddings, self.save_dtype, metadata)
        logger.info(f"saved {path}")

    def training_parts(self, parts: TrainingParts, samples: SampleSettings | None) -> TrainingParts:
        """``parts`` with captions expanded to the new tokens (per XTI layer) and samples (made with ``samples``,
        the flags' sample settings) that know the token."""
        encode = partial(_encode_expanded, parts.encode_text, self)
        sample = parts.sample
        if sample is not None:
            sample = None if self.xti or samples is None else partial(_sample_expanded, self, samples)
            if self.xti:
                logger.warning("sample images are not supported by train_textual_inversion_XTI.py; none are made")
        return dataclasses.replace(parts, encode_text=encode, sample=sample)


def _encode_expanded(
    base: TextEncoding,
    recipe: TextualInversionRecipe,
    text_encoders: Sequence[nn.Module],
    tokenizers: Sequence[Any],
    captions: list[str],
    batch: Mapping[str, Any] | None = None,
) -> Conditioning:
    """``base``'s conditioning of the captions with the token string expanded (XTI: per layer, stacked)."""
    token = recipe.settings.token_string
    if not recipe.xti:
        return base(text_encoders, tokenizers, [expand_text(c, token, recipe.strings) for c in captions], batch)
    from library.xti import layer_conditioning

    states = layer_conditioning(
        lambda texts: base(text_encoders, tokenizers, texts, batch).hidden_states,
        captions,
        lambda caption, layer: expand_text(caption, token, recipe.layer_tokens(layer)),
    )
    return Conditioning(states)


def _sample_expanded(recipe: TextualInversionRecipe, settings: SampleSettings, request: SampleRequest) -> list:
    from library.sampling import sample_images
    from library.sampling.hook import for_request

    token = recipe.settings.token_string
    replacement = (token, " ".join(recipe.strings)) if len(recipe.strings) > 1 else None
    return sample_images(
        request.components,
        for_request(settings, request),
        epoch=request.epoch,
        step=request.step,
        device=request.device,
        prompt_replacement=replacement,
    )
