"""Captioning a folder of images with BLIP or GIT (sd-scripts' ``finetune/make_captions.py`` and
``make_captions_by_git.py``), through transformers' own model classes.

One batched loop serves both: images whose caption file exists are skipped unless ``--overwrite`` (so a re-run
continues where an interrupted one stopped), the rest are decoded in threads, captioned a batch at a time and each
caption is written atomically beside its image right after its batch. Sampled BLIP captions draw from one random
generator per image, seeded from ``--seed`` and the image's path, so a caption does not depend on the batch size or on
which other images were already done.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from library.errors import UserError
from library.prep.common import PrepReport, find_images, load_batches, load_pretrained, sidecar, todo, write_side_file

logger = logging.getLogger("sdtrain.prep")

Batch = list[tuple[Path, Image.Image]]
Captioner = Callable[[Batch], list[str]]

BLIP_PROMPT = "a picture of "
"""The text BLIP's captioning decoder was trained to continue (sd-scripts' ``blip_decoder`` prompt); it is removed
from the caption."""

SAMPLING_TOP_K = 50
"""transformers' default top-k, which sd-scripts' nucleus sampling also applies (it leaves ``top_k`` unset)."""

SAMPLING_REPETITION_PENALTY = 1.1
"""sd-scripts' BLIP repetition penalty when sampling (1.0 in beam search)."""

REMOVE_PATTERNS = tuple(
    re.compile(p)
    for p in (
        r'(has|with|and) the (words?|letters?|name) (" ?[^"]*"|\w+)( ?(is )?(on|in) (the |her |their |him )?\w+)?',
        r'(with a sign )?that says ?(" ?[^"]*"|\w+)( ?on it)?',
        r"(with a sign )?that says ?(' ?(i'm)?[^']*'|\w+)( ?on it)?",
        r"with the number \d+ on (it|\w+ \w+)",
        r'with the words "',
        r"word \w+ on it",
        r"that says the word \w+ on it",
        "that says'the word \"( on it)?",
    )
)
"""GIT (trained on TextCaps) likes to read text that is not there: ``with the words "..."``, ``that says ...``.
``--remove_words`` deletes these phrases, in this order, exactly as sd-scripts does."""


@dataclass(frozen=True)
class CaptionRun:
    """Where and how to write captions: the flags both captioning scripts share."""

    train_data_dir: Path
    caption_extension: str = ".caption"
    recursive: bool = False
    overwrite: bool = False
    batch_size: int = 1
    workers: int | None = None
    debug: bool = False


def caption_folder(run: CaptionRun, make_captioner: Callable[[], Captioner], what: str) -> PrepReport:
    """Caption every image under ``run.train_data_dir`` that has no caption file yet (all with ``overwrite``),
    writing ``<image stem><caption_extension>`` beside each image after its batch; returns the counts.

    ``make_captioner`` (which loads the model) is called only when some image is left to caption."""
    if run.batch_size < 1:
        raise UserError(f"--batch_size {run.batch_size}: must be 1 or more")
    images = find_images(run.train_data_dir, run.recursive)
    logger.info("found %d images in %s", len(images), run.train_data_dir)
    report = PrepReport(what)
    remaining = todo(images, lambda p: sidecar(p, run.caption_extension).exists(), run.overwrite, report)
    if remaining:
        captioner = make_captioner()
        report.started = time.monotonic()
        for batch in load_batches(remaining, run.batch_size, report, run.workers):
            captions = captioner(batch)
            for (path, _), caption in zip(batch, captions, strict=True):
                write_side_file(sidecar(path, run.caption_extension), caption + "\n", run.overwrite, report)
                if run.debug:
                    logger.info("%s: %s", path, caption)
            report.processed += len(batch)
    report.log(f"{report.written} caption files ({run.caption_extension}) beside the images")
    return report


def image_seed(seed: int, key: str) -> int:
    """The sampling seed of one image: ``--seed`` mixed with a checksum of its path relative to the folder."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63)


class RowwiseSampling:
    """Nucleus sampling (top-k 50, then top-p) with one random generator per batch row, used as the last logits
    processor of a greedy search: the chosen token keeps score 0, every other token -inf, so argmax picks it.

    Each row draws only from its own generator, so its tokens do not depend on the other rows in the batch."""

    def __init__(self, seeds: Sequence[int], top_p: float, device: torch.device) -> None:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.top_k = TopKLogitsWarper(SAMPLING_TOP_K)
        self.top_p = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.top_p(input_ids, self.top_k(input_ids, scores))
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, picks, 0.0)


@dataclass(frozen=True)
class BlipOptions:
    """How BLIP generates: sd-scripts' beam search or nucleus sampling, and the caption length limits (in tokens,
    prompt included)."""

    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p {self.top_p}: must be above 0 and at most 1")
        if self.num_beams < 1:
            raise UserError(f"--num_beams {self.num_beams}: must be 1 or more")
        if self.max_length < 1:
            raise UserError(f"--max_length {self.max_length}: must be 1 or more")
        if not 0 <= self.min_length <= self.max_length:
            raise UserError(f"--min_length {self.min_length}: must be between 0 and --max_length {self.max_length}")


def load_blip(name: str, device: torch.device) -> tuple[Any, Any]:
    """A transformers BLIP captioning model (``BlipForConditionalGeneration``) and its processor from a hub id or
    folder, in eval mode on ``device``. sd-scripts' ``.pth`` weights are refused with a pointer to the hub model."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    if name.endswith((".pth", ".pt", ".ckpt")) or "://" in name:
        raise UserError(
            f"--caption_weights {name}: sd-scripts' original BLIP weights are not supported; pass a transformers "
            "BLIP captioning model id or folder, such as Salesforce/blip-image-captioning-large"
        )
    processor = load_pretrained(BlipProcessor.from_pretrained, name, "--caption_weights")
    model = load_pretrained(BlipForConditionalGeneration.from_pretrained, name, "--caption_weights")
    return model.to(device).eval(), processor


def blip_captioner(model: Any, processor: Any, options: BlipOptions, root: Path, device: torch.device) -> Captioner:
    """A captioner running BLIP on a batch: beam search (``num_beams``) or per-image seeded nucleus sampling."""
    from transformers import LogitsProcessorList

    def run(batch: Batch) -> list[str]:
        paths = [p for p, _ in batch]
        inputs = processor(images=[im for _, im in batch], text=[BLIP_PROMPT] * len(batch), return_tensors="pt")
        kwargs: dict[str, Any] = dict(max_length=options.max_length, min_length=options.min_length, do_sample=False)
        if options.beam_search:
            kwargs.update(num_beams=options.num_beams, repetition_penalty=1.0)
        else:
            seeds = [image_seed(options.seed, p.relative_to(root).as_posix()) for p in paths]
            sampler = RowwiseSampling(seeds, options.top_p, device)
            kwargs.update(num_beams=1, repetition_penalty=SAMPLING_REPETITION_PENALTY)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.inference_mode():
            ids = model.generate(
                pixel_values=inputs["pixel_values"].to(device), input_ids=inputs["input_ids"].to(device), **kwargs
            )
        return [strip_prompt(text) for text in processor.batch_decode(ids, skip_special_tokens=True)]

    return run


def strip_prompt(text: str) -> str:
    """The caption without BLIP's ``a picture of`` prompt."""
    prompt = BLIP_PROMPT.strip()
    return text[len(prompt) :].strip() if text.startswith(prompt) else text.strip()


def load_git(name: str, device: torch.device) -> tuple[Any, Any]:
    """A transformers GIT model (``AutoModelForCausalLM``, e.g. ``GitForCausalLM``) and its processor from a hub
    id or folder, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = load_pretrained(AutoProcessor.from_pretrained, name, "--model_id")
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, name, "--model_id")
    return model.to(device).eval(), processor


def remove_words(caption: str) -> str:
    """``caption`` without GIT's imagined text phrases (``--remove_words``), as sd-scripts removes them."""
    for pattern in REMOVE_PATTERNS:
        caption = pattern.sub("", caption)
    return caption


@dataclass(frozen=True)
class GitOptions:
    """How GIT generates: greedy, at most ``max_length`` tokens, optionally without imagined text phrases."""

    max_length: int = 50
    remove_words: bool = False

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise UserError(f"--max_length {self.max_length}: must be 1 or more")


def git_captioner(model: Any, processor: Any, options: GitOptions, device: torch.device) -> Captioner:
    """A captioner running GIT's greedy generation on a batch."""

    def run(batch: Batch) -> list[str]:
        inputs = processor(images=[im for _, im in batch], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(pixel_values=inputs["pixel_values"].to(device), max_length=options.max_length)
        captions = processor.batch_decode(ids, skip_special_tokens=True)
        if not options.remove_words:
            return captions
        cleaned = [remove_words(c) for c in captions]
        for before, after in zip(captions, cleaned):
            if before != after:
                logger.debug("--remove_words: %r -> %r", before, after)
        return cleaned

    return run
