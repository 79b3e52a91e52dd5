"""Tag a folder of images with a WD14 tagger (SmilingWolf's ONNX models) through onnxruntime, writing one tag file
per image as sd-scripts' finetune/tag_images_by_wd14_tagger.py does.

The model folder holds ``model.onnx`` and ``selected_tags.csv``. It is looked for locally first (``--repo_id`` as a
folder, ``--model_dir/<repo id with / as _>``, ``--model_dir`` itself) and only downloaded from the Hugging Face
hub when absent (or with ``--force_download``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from library.dataset.images import open_image, pick_resample
from library.dataset.scan import read_size
from library.errors import UserError
from library.io import atomic_write_json, atomic_write_text
from library.prep.common import PrepReport, find_images, load_batches, sidecar, todo
from library.prep.tag_order import (
    TagOptions,
    TagTable,
    merge_with_existing,
    parse_tag_replacement,
    rename_tags,
    select_tags,
    split_tags,
)

logger = logging.getLogger("sdtrain.prep")

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
WHITE = (255, 255, 255)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class TaggerSettings:
    """The flags of tag_images_by_wd14_tagger.py (thresholds already resolved against ``--thresh``)."""

    train_data_dir: str
    repo_id: str = DEFAULT_REPO_ID
    model_dir: str = DEFAULT_MODEL_DIR
    force_download: bool = False
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    batch_size: int = 1
    max_data_loader_n_workers: int | None = None
    caption_extension: str = ".txt"
    caption_separator: str = ", "
    remove_underscore: bool = False
    character_tag_expand: bool = False
    undesired_tags: str = ""
    always_first_tags: str | None = None
    tag_replacement: str | None = None
    character_tags_first: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    append_tags: bool = False
    frequency_tags: bool = False
    recursive: bool = False
    overwrite: bool = False
    device: str | None = None
    output_path: str | None = None

    def tag_options(self) -> TagOptions:
        """The selection and ordering part of the settings."""
        return TagOptions(
            general_threshold=self.general_threshold,
            character_threshold=self.character_threshold,
            undesired_tags=frozenset(split_tags(self.undesired_tags, self.caption_separator)),
            always_first_tags=tuple(split_tags(self.always_first_tags or "", self.caption_separator)),
            character_tags_first=self.character_tags_first,
            use_rating_tags=self.use_rating_tags,
            use_rating_tags_as_last_tag=self.use_rating_tags_as_last_tag,
        )


def has_model(folder: Path) -> bool:
    """True when ``folder`` holds both tagger files."""
    return (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file()


def local_model(repo_id: str, model_dir: str) -> Path | None:
    """The first folder holding both tagger files: ``repo_id`` as a path, ``model_dir/<repo id with / as _>``
    (sd-scripts' layout), ``model_dir`` itself; None when there is none."""
    candidates = (Path(repo_id), Path(model_dir) / repo_id.replace("/", "_"), Path(model_dir))
    return next((folder for folder in candidates if folder.is_dir() and has_model(folder)), None)


def locate_model(repo_id: str, model_dir: str, force_download: bool = False) -> Path:
    """The folder holding ``model.onnx`` and ``selected_tags.csv``: a local one when present, else downloaded into
    ``model_dir/<repo id with / as _>``. A failed download is one line naming the id."""
    local = local_model(repo_id, model_dir)
    if local is not None and not force_download:
        return local
    if len(repo_id.split("/")) > 2:
        raise UserError(
            f"--repo_id {repo_id}: only SmilingWolf-style taggers (model.onnx + selected_tags.csv at the repo root) "
            "are supported; sub-folder models with tag_mapping.json are not"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    target = Path(model_dir) / repo_id.replace("/", "_")
    logger.info("downloading the WD14 tagger %s into %s", repo_id, target)
    for name in (TAGS_FILE, MODEL_FILE):
        if (target / name).is_file() and not force_download:
            continue
        try:
            hf_hub_download(repo_id=repo_id, filename=name, local_dir=target, force_download=force_download)
        except (OSError, ValueError, EntryNotFoundError) as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            hint = (
                f"drop --force_download to use the copy in {local}"
                if local
                else f"offline, put {MODEL_FILE} and {TAGS_FILE} in {target} or pass --model_dir <folder with them>"
            )
            raise UserError(f"--repo_id {repo_id}: cannot download {name} ({reason}); {hint}") from None
    return target


def read_tag_table(path: Path) -> TagTable:
    """``selected_tags.csv`` (header ``tag_id,name,category,…``) as a table of names and categories."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: cannot read the tag list ({e}); download the tagger again with --force_download"
        ) from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        head = ",".join(rows[0][:4]) if rows else "empty file"
        raise UserError(f"{path}: expected the header tag_id,name,category,count, found {head!r}")
    body = [r for r in rows[1:] if r]
    bad = next((n for n, r in enumerate(body, start=2) if len(r) < 3), None)
    if bad is not None:
        raise UserError(f"{path}: line {bad} has fewer than 3 columns (tag_id,name,category)")
    return TagTable(tuple(r[1] for r in body), tuple(r[2].strip() for r in body))


def pick_providers(device: str | None, available: list[str]) -> list[Any]:
    """onnxruntime providers for ``--device``: CUDA when asked for (or by default) and installed, else CPU; asking for
    CUDA without the CUDA provider says so in one line and runs on CPU."""
    if device is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    name, _, index = device.partition(":")
    if name == "cpu":
        return [CPU]
    if name != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N")
    if CUDA not in available:
        logger.warning(
            "--device %s: onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on CPU", device
        )
        return [CPU]
    return [(CUDA, {"device_id": int(index or 0)}), CPU]


@dataclass
class Tagger:
    """An onnxruntime session over a WD14 model: NHWC BGR float32 0-255 input of ``size`` (width, height)."""

    session: Any
    input_name: str
    size: tuple[int, int]
    fixed_batch: int | None

    @classmethod
    def load(cls, path: Path, device: str | None) -> Tagger:
        """Open ``model.onnx`` and read its input size (and fixed batch size, if any) from the input shape."""
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        load_errors = (
            RuntimeError,
            OSError,
            ValueError,
            ort_state.Fail,
            ort_state.InvalidArgument,
            ort_state.InvalidGraph,
            ort_state.InvalidProtobuf,
            ort_state.NoSuchFile,
            ort_state.NotImplemented,
            ort_state.RuntimeException,
        )
        providers = pick_providers(device, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except load_errors as e:
            reason = str(e).strip().splitlines()[0][:200]
            raise UserError(f"{path}: onnxruntime cannot load this model ({reason}); try --force_download") from None
        logger.info("onnxruntime providers: %s", ", ".join(session.get_providers()))
        spec = session.get_inputs()[0]
        shape = list(spec.shape)
        if len(shape) != 4 or shape[3] != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:3]):
            raise UserError(
                f"{path}: input {spec.name} has shape {shape}; a WD14 tagger takes (batch, height, width, 3)"
            )
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return cls(session, spec.name, (shape[2], shape[1]), fixed)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, tags) for a batch; a model with a fixed batch size gets the batch padded to it."""
        count = len(images)
        if self.fixed_batch and count < self.fixed_batch:
            padding = np.zeros((self.fixed_batch - count, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, padding])
        return self.session.run(None, {self.input_name: images})[0][:count]


def open_for_tagger(path: Path, size: tuple[int, int]) -> Image.Image:
    """sd-scripts' WD14 preprocessing up to the pixels: transparency onto white, padded to a centred square with
    white, resized to ``size`` (area when shrinking, Lanczos when enlarging). RGB; :func:`to_model_input` makes BGR."""
    image = open_image(path, keep_alpha=True)
    flat = Image.new("RGB", image.size, WHITE)
    flat.paste(image, mask=image.getchannel("A"))
    width, height = flat.size
    side = max(width, height)
    if width != height:
        square = Image.new("RGB", (side, side), WHITE)
        square.paste(flat, ((side - width) // 2, (side - height) // 2))
        flat = square
    if flat.size != size:
        flat = flat.resize(size, pick_resample(None, flat.size, size))
    return flat


def to_model_input(images: list[Image.Image]) -> np.ndarray:
    """RGB images -> one NHWC BGR float32 0-255 batch."""
    return np.ascontiguousarray(np.stack([np.asarray(im) for im in images])[..., ::-1], dtype=np.float32)


def model_table(settings: TaggerSettings, folder: Path, outputs: int | None = None) -> TagTable:
    """The renamed tag table of the model in ``folder``, checked against the model's output count."""
    replacements = parse_tag_replacement(settings.tag_replacement) if settings.tag_replacement else []
    table = rename_tags(
        read_tag_table(folder / TAGS_FILE),
        settings.caption_separator,
        character_tag_expand=settings.character_tag_expand,
        underscores_to_spaces=settings.remove_underscore,
        replacements=replacements,
    )
    if outputs is not None and outputs != len(table.names):
        raise UserError(
            f"{folder}: {MODEL_FILE} gives {outputs} scores but {TAGS_FILE} lists {len(table.names)} tags; "
            "the two files come from different taggers, download them again with --force_download"
        )
    return table


def write_tags(path: Path, tags: list[str], settings: TaggerSettings, report: PrepReport) -> None:
    """Write one tag file; with ``--append_tags`` an existing file gets only the tags it lacks (unchanged files are
    not rewritten, so a re-run appends nothing)."""
    text = settings.caption_separator.join(tags)
    if settings.append_tags and path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            report.fail(path, f"cannot read the existing tag file to append to ({e})")
            return
        text = merge_with_existing(existing, tags, settings.caption_separator)
        if text + "\n" == existing:
            return
    atomic_write_text(path, text + "\n")
    report.written += 1


def write_metadata_output(path: str, entries: dict[str, dict[str, Any]]) -> None:
    """``--output_path``: sd-scripts' metadata instead of tag files, atomically. ``.jsonl``: one
    ``{"image_path", "caption", "image_size"}`` object per line; otherwise one JSON object
    ``{image_path: {"tags", "image_size"}}``. Both are metadata files fine_tune.py reads (``--in_json``)."""
    if path.endswith(".jsonl"):
        lines = [
            json.dumps({"image_path": key, "caption": entry["tags"], "image_size": entry["image_size"]})
            for key, entry in entries.items()
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
    else:
        atomic_write_json(path, entries)


def tag_images(settings: TaggerSettings) -> tuple[PrepReport, Counter[str]]:
    """Tag every image under ``train_data_dir`` that has no tag file yet (all of them with ``--overwrite``,
    ``--append_tags`` or ``--output_path``); returns the report and how often each tag was written. When every
    image is done the model is not even loaded."""
    images = find_images(settings.train_data_dir, settings.recursive)
    options = settings.tag_options()
    if settings.tag_replacement:
        parse_tag_replacement(settings.tag_replacement)
    logger.info("found %d images", len(images))
    report = PrepReport("tagging")
    frequencies: Counter[str] = Counter()
    entries: dict[str, dict[str, Any]] = {}
    if settings.append_tags or settings.output_path:
        remaining = list(images)
    else:
        remaining = todo(images, lambda p: sidecar(p, settings.caption_extension).exists(), settings.overwrite, report)
    outputs = settings.output_path or (
        f"tag files ({settings.caption_extension}) next to the images in {settings.train_data_dir}"
    )
    if not remaining:
        report.log(outputs)
        return report, frequencies

    folder = locate_model(settings.repo_id, settings.model_dir, settings.force_download)
    tagger = Tagger.load(folder / MODEL_FILE, settings.device)
    scores_per_image = tagger.session.get_outputs()[0].shape[-1]
    table = model_table(settings, folder, scores_per_image if isinstance(scores_per_image, int) else None)
    batch_size = settings.batch_size
    if tagger.fixed_batch and tagger.fixed_batch != batch_size:
        batch_size = tagger.fixed_batch
        logger.warning("--batch_size %d: this model takes batches of %d; using that", settings.batch_size, batch_size)
    opener = partial(open_for_tagger, size=tagger.size)
    for batch in load_batches(remaining, batch_size, report, settings.max_data_loader_n_workers, opener):
        probs = tagger(to_model_input([image for _, image in batch]))
        for (path, _), scores in zip(batch, probs):
            tags = select_tags(scores.tolist(), table, options)
            if settings.output_path:
                text = settings.caption_separator.join(tags)
                entries[str(path)] = {"tags": text, "image_size": list(read_size(path))}
            else:
                write_tags(sidecar(path, settings.caption_extension), tags, settings, report)
            frequencies.update(tags)
            report.processed += 1
            logger.debug("%s: %s", path, settings.caption_separator.join(tags))
    if settings.output_path:
        write_metadata_output(settings.output_path, entries)
        report.written += 1
    report.log(outputs)
    return report, frequencies


def frequency_lines(frequencies: Counter[str]) -> list[str]:
    """``--frequency_tags``: ``Tag frequencies:`` then ``tag: count``, most frequent first (ties in first-seen
    order), as sd-scripts prints them."""
    return ["Tag frequencies:"] + [f"{tag}: {count}" for tag, count in frequencies.most_common()]
