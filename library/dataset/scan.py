"""Find a subset's images on disk, read their sizes from the file headers and their captions.

DreamBooth style: every image in ``image_dir`` (and its sub-folders with the subset key ``recursive = true``),
captions from ``<stem><caption_extension>`` and masks ``<stem>-masklabel.png`` beside each image.
Fine-tuning style: images and captions listed in a metadata file (.json ``{image_key: {"caption", "tags"}}`` or
.jsonl, one ``{"image_key"|"file_name"|"image_path", "caption"|"text", "tags"}`` object per line); with
``recursive`` a key is also looked up by file name in image_dir's sub-folders. An entry with
prepare_buckets_latents.py's ``train_resolution`` is trained at that bucket, and its ``<image_key>.npz`` is noted
(``ImageRecord.latents_npz``); an entry whose image is gone but whose npz is there is kept (sd-scripts trains from
the npz alone).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from library.config.dataset_schema import clip
from library.dataset.epoch import describe_balancing, samples_per_epoch
from library.dataset.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import UserError

logger = logging.getLogger("sdtrain.dataset")

MASK_SUFFIX = "-masklabel.png"
DEFAULT_CAPTION_EXTENSION = ".caption"
FOLDER_NAME_CAPTIONS = ".none-use-foldername"  # kohya_ss: no caption files, use the class tokens (folder name)
INFO_CACHE_FILE = "metadata_cache.json"  # sd-scripts' cache_info file name
_BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_HEADER_WORKERS = 8


def image_extensions() -> tuple[str, ...]:
    """Lower-case image extensions scanned: sd-scripts' set, plus .avif/.jxl when this Pillow can open them."""
    registered = Image.registered_extensions()
    extra = tuple(ext for ext in (".avif", ".jxl") if ext in registered)
    return _BASE_EXTENSIONS + extra


@dataclass
class ScanResult:
    """Images found for a subset or dataset, the files skipped (with the reason) and where captions came from."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    caption_sources: dict[int, str] = field(default_factory=dict)  # subset index -> ".txt", ".caption", "metadata"


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the image header; the pixels are not decoded."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = _exif_orientation(image) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


def _exif_orientation(image: Image.Image) -> int:
    """EXIF orientation from header bytes only (``getexif()`` would decode a whole PNG to look for it)."""
    raw = image.info.get("exif")
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    return image.getexif().get(0x0112, 1) if image.format == "TIFF" else 1


def _try_size(path: Path) -> tuple[int, int] | str:
    try:
        width, height = read_size(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot read image: {e}"
    if width <= 0 or height <= 0:
        return f"image has no pixels ({width}x{height})"
    return (width, height)


def _read_sizes(paths: list[Path]) -> list[tuple[int, int] | str]:
    if len(paths) < 64:
        return [_try_size(p) for p in paths]
    with ThreadPoolExecutor(_HEADER_WORKERS) as pool:
        return list(pool.map(_try_size, paths))


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file (BOM allowed); unreadable or non-UTF-8 files become a one-line UserError naming ``what``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{clip(path)}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{clip(path)}: {what} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); re-save it as UTF-8"
        ) from None


def read_caption_file(path: Path, all_lines: bool) -> tuple[str, ...]:
    """Caption candidates in a caption file: the first line, or every non-empty line (``enable_wildcard``)."""
    text = read_text_file(path, "caption file")
    lines = [line.strip() for line in text.splitlines()]
    if all_lines:
        return tuple(line for line in lines if line)
    return (lines[0],) if lines and lines[0] else ()


def _caption_extension(subset: SubsetConfig, names: set[str]) -> str:
    """The subset's caption extension; for the default ``.caption`` only, ``.txt`` when just .txt files exist.

    An extension chosen on purpose is kept even when no file has it: kohya_ss writes ``.none-use-foldername`` so
    that sd-scripts finds no caption file and trains every image with the class tokens (the folder name).
    """
    ext = subset.caption_extension
    if ext != DEFAULT_CAPTION_EXTENSION or any(n.endswith(ext) for n in names):
        if ext == FOLDER_NAME_CAPTIONS:
            logger.info(f"{subset.name}: caption_extension {ext}: every image is captioned with its class tokens")
        return ext
    if any(n.endswith(".txt") for n in names):
        logger.info(f"{subset.name}: no '{ext}' caption files in {subset.image_dir}; using the .txt files found there")
        return ".txt"
    return ext


def _caption_name(stem: str, ext: str, names: set[str]) -> str | None:
    """sd-scripts also accepts the caption of the face-crop base name (``name_cx_cy_w_h`` -> ``name``)."""
    if stem + ext in names:
        return stem + ext
    tokens = stem.split("_")
    if len(tokens) >= 5 and "_".join(tokens[:-4]) + ext in names:
        return "_".join(tokens[:-4]) + ext
    return None


def _load_info_cache(image_dir: Path) -> dict:
    path = image_dir / INFO_CACHE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        logger.warning(f"{path}: unreadable image info cache; scanning the folder instead")
        return {}
    return data if isinstance(data, dict) else {}


def _save_info_cache(subset: SubsetConfig, image_dir: Path, records: list[ImageRecord]) -> None:
    """Write sd-scripts' ``metadata_cache.json``; a missing caption is stored as the class tokens (as sd-scripts)."""
    from library.io import atomic_write_json

    fallback = subset.class_tokens or ""
    entries = {str(r.path): {"caption": "\n".join(r.captions) or fallback, "resolution": list(r.size)} for r in records}
    try:
        atomic_write_json(image_dir / INFO_CACHE_FILE, entries)
    except OSError as e:
        logger.warning(f"{subset.name}: cannot write {image_dir / INFO_CACHE_FILE} ({e.strerror}); not caching")


def _list_files(folder: Path, where: str, key: str) -> set[str]:
    """Names of the plain files in ``folder``; a folder that cannot be read is a UserError naming ``key``."""
    try:
        with os.scandir(folder) as it:
            return {entry.name for entry in it if entry.is_file()}
    except OSError as e:
        raise UserError(f"{where}: {key} '{clip(folder)}' cannot be read ({e.strerror or type(e).__name__})") from None


def match_conditioning(subset: SubsetConfig, images: list[Path]) -> dict[Path, Path]:
    """sd-scripts' pairing of images with conditioning (mask) images: same file stem, any image extension.

    An image without a conditioning image is a UserError (sd-scripts stops too); conditioning images without a
    training image are listed in a warning (sd-scripts refuses them; they are harmless here).
    """
    folder = subset.conditioning_data_dir
    assert folder is not None
    extensions = image_extensions()
    by_stem: dict[str, Path] = {}
    for name in sorted(_list_files(folder, subset.name, "conditioning_data_dir")):
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions:
            by_stem.setdefault(stem, folder / name)
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        shown = ", ".join(clip(n, 40) for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(
            f"{subset.name}: {len(missing)} image(s) have no conditioning image of the same name in "
            f"conditioning_data_dir '{clip(folder)}' ({shown}); add them or remove conditioning_data_dir"
        )
    stems = {p.stem for p in images}
    extra = sorted(stem for stem in by_stem if stem not in stems)
    if extra:
        logger.warning(
            f"{subset.name}: {len(extra)} conditioning image(s) in '{clip(folder)}' match no training image and are "
            f"not used (e.g. {clip(extra[0], 40)})"
        )
    return {p: by_stem[p.stem] for p in images}


def _folders(subset: SubsetConfig, image_dir: Path) -> list[tuple[Path, set[str]]]:
    """(folder, file names) for ``image_dir`` and, with ``recursive``, every sub-folder below it (sorted; folders
    whose name starts with '.' are left out, symbolic links to folders are not followed)."""
    if not subset.recursive:
        return [(image_dir, _list_files(image_dir, subset.name, "image_dir"))]
    found = []
    for folder, dirs, _ in os.walk(image_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.append((Path(folder), _list_files(Path(folder), subset.name, "image_dir")))
    return found


def _scan_folder(subset: SubsetConfig, subset_index: int) -> ScanResult:
    image_dir = subset.image_dir
    assert image_dir is not None
    if not image_dir.is_dir():
        raise UserError(f"{subset.name}: image_dir '{clip(image_dir)}' does not exist or is not a folder")
    folders = _folders(subset, image_dir)
    extensions = image_extensions()
    in_folder: dict[Path, tuple[Path, set[str]]] = {}
    for folder, names in folders:
        for n in names:
            if os.path.splitext(n)[1].lower() in extensions and not n.endswith(MASK_SUFFIX):
                in_folder[folder / n] = (folder, names)
    images = sorted(in_folder)
    ext = _caption_extension(subset, set().union(*(names for _, names in folders)))
    cache = _load_info_cache(image_dir) if subset.cache_info else {}
    conditioning = match_conditioning(subset, images) if subset.conditioning_data_dir is not None else {}

    result = ScanResult(caption_sources={subset_index: ext})
    uncached = [p for p in images if not _cache_entry_ok(cache.get(str(p)))]
    sizes = dict(zip(uncached, _read_sizes(uncached)))
    for path in images:
        folder, names = in_folder[path]
        entry = cache.get(str(path))
        if _cache_entry_ok(entry):
            size = (int(entry["resolution"][0]), int(entry["resolution"][1]))
            captions = tuple(line for line in str(entry.get("caption") or "").split("\n") if line)
        else:
            size_or_error = sizes[path]
            if isinstance(size_or_error, str):
                logger.warning(f"{subset.name}: skipping {path}: {size_or_error}")
                result.skipped.append((path, size_or_error))
                continue
            size = size_or_error
            caption_name = _caption_name(path.stem, ext, names)
            captions = read_caption_file(folder / caption_name, subset.enable_wildcard) if caption_name else ()
        mask = folder / (path.stem + MASK_SUFFIX) if path.stem + MASK_SUFFIX in names else None
        result.records.append(ImageRecord(path, size, captions, subset_index, mask, conditioning.get(path)))
    if subset.cache_info and (uncached or len(cache) != len(result.records)):
        _save_info_cache(subset, image_dir, result.records)
    return result


def _cache_entry_ok(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    res = entry.get("resolution")
    return isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)


def read_metadata(path: Path) -> dict[str, dict]:
    """Fine-tuning metadata as ``{image_key: {"caption": ..., "tags": ...}}`` from a .json or .jsonl file."""
    text = read_text_file(path, "metadata file")
    if path.suffix.lower() == ".jsonl":
        out: dict[str, dict] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise UserError(f"{path}: line {number}: not valid JSON ({clip(getattr(e, 'msg', e))})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object, got {line.strip()[:40]}")
            key = row.get("image_key") or row.get("file_name") or row.get("image_path")
            if not key:
                raise UserError(f"{path}: line {number}: needs an 'image_key', 'file_name' or 'image_path' field")
            out[str(key)] = {"caption": row.get("caption", row.get("text")), "tags": row.get("tags")}
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({clip(f'{type(e).__name__}: {e}')})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f'{path}: metadata must be a JSON object {{image_key: {{"caption": ..., "tags": ...}}}}')
    return data


def metadata_captions(entry: dict, subset: SubsetConfig) -> tuple[str, ...]:
    """Caption candidates of one metadata entry: ``caption`` plus ``tags``, as sd-scripts' FineTuningDataset."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        caption, tags = tags, None
    sep = subset.caption_separator
    if subset.enable_wildcard:
        if caption is not None and tags is not None:
            tags = tags.replace("\n", sep)
            caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
        return tuple(line.strip() for line in (caption or "").split("\n") if line.strip())
    if tags:
        caption = caption + sep + tags
    return (caption,) if caption else ()


def _is_file(path: Path, dir_ok: bool = False) -> bool:
    """``is_file()`` (or ``is_dir()``) that says False for names the OS cannot look up (too long, NUL byte)."""
    try:
        return path.is_dir() if dir_ok else path.is_file()
    except (OSError, ValueError):
        return False


def _find_image(
    key: str, image_dir: Path | None, names: set[str], extensions: tuple[str, ...], below: dict[str, Path]
) -> Path | None:
    """sd-scripts' lookup: the key as a path, else ``image_dir/<key><ext>`` for each image extension; then (subset
    key ``recursive``) a file of that name in a sub-folder of ``image_dir`` (``below``: file name -> path)."""
    as_path = Path(key)
    if _is_file(as_path) and as_path.suffix.lower() in extensions:
        return as_path
    for spelled in [""] + [e for ext in extensions for e in (ext, ext.upper())]:
        if key + spelled in names and (spelled or as_path.suffix.lower() in extensions):
            return image_dir / (key + spelled)  # type: ignore[operator]
    bases = [as_path] + ([image_dir / key] if image_dir is not None and "/" in key else [])
    for base in bases:
        if not base.name:
            continue
        for ext in extensions:
            for spelled in (ext, ext.upper()):
                path = base.with_name(base.name + spelled)
                if _is_file(path):
                    return path
    for spelled in [""] + [e for ext in extensions for e in (ext, ext.upper())]:
        if key + spelled in below and (spelled or as_path.suffix.lower() in extensions):
            return below[key + spelled]
    return None


def _files_below(subset: SubsetConfig, image_dir: Path) -> dict[str, Path]:
    """File name -> path for the files in the sub-folders of ``image_dir`` (the first in sorted order wins)."""
    below: dict[str, Path] = {}
    for folder, names in _folders(subset, image_dir)[1:]:
        for name in sorted(names):
            below.setdefault(name, folder / name)
    return below


def prepared_npz(key: str, image_dir: Path | None) -> Path | None:
    """prepare_buckets_latents.py's latents of ``key`` where sd-scripts' fine-tuning dataset looks for them:
    ``<key without extension>.npz`` (full-path keys), else ``image_dir/<key>.npz``."""
    base = Path(os.path.splitext(key)[0] + ".npz")
    if _is_file(base):
        return base
    if image_dir is None:
        return None
    path = image_dir / (key + ".npz")
    return path if _is_file(path) else None


def _train_resolution(entry: dict, key: str, metadata_file: Path) -> tuple[int, int] | None:
    """The ``train_resolution`` (width, height) prepare_buckets_latents.py stored for ``key``, checked."""
    value = entry.get("train_resolution")
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in value)
    ):
        return (value[0], value[1])
    raise UserError(
        f"{metadata_file}: '{clip(key, 40)}': 'train_resolution' must be [width, height] in positive multiples of 8, "
        f"got {clip(json.dumps(value))}; re-run prepare_buckets_latents.py or remove the entry"
    )


def _npz_original_size(path: Path) -> tuple[int, int] | str:
    """The ``original_size`` (width, height) stored in a latents npz, or why it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            width, height = (int(v) for v in z["original_size"].tolist())
    except Exception as e:  # a truncated or foreign file fails in many ways
        return f"image not found and its latents file {path} is unreadable ({type(e).__name__})"
    if width <= 0 or height <= 0:
        return f"image not found and its latents file {path} has no valid original_size"
    return (width, height)


def _scan_metadata(subset: SubsetConfig, subset_index: int) -> ScanResult:
    assert subset.metadata_file is not None
    metadata = read_metadata(subset.metadata_file)
    extensions = image_extensions()
    image_dir = subset.image_dir
    has_dir = image_dir is not None and _is_file(image_dir, dir_ok=True)
    names = _list_files(image_dir, subset.name, "image_dir") if has_dir else set()  # type: ignore[arg-type]
    below = _files_below(subset, image_dir) if has_dir and subset.recursive else {}  # type: ignore[arg-type]
    result = ScanResult(caption_sources={subset_index: "metadata"})
    found: list[tuple[Path, tuple[str, ...], tuple[int, int] | None, Path | None]] = []
    known: dict[int, tuple[int, int]] = {}  # index into found -> size, for images gone whose npz is there
    for key, entry in metadata.items():
        for field_name in ("caption", "tags"):
            if entry.get(field_name) is not None and not isinstance(entry[field_name], str):
                raise UserError(f"{subset.metadata_file}: '{key}': '{field_name}' must be a string")
        bucket = _train_resolution(entry, key, subset.metadata_file)
        npz = prepared_npz(key, image_dir if has_dir else None) if bucket is not None else None
        path = _find_image(key, image_dir, names, extensions, below)
        if path is None and npz is not None:
            size = _npz_original_size(npz)  # sd-scripts trains from the npz alone when the image is gone
            if isinstance(size, str):
                logger.warning(f"{subset.name}: skipping '{key}': {size}")
                result.skipped.append((Path(key), size))
                continue
            known[len(found)] = size
            path = image_dir / key if image_dir is not None and not Path(key).is_absolute() else Path(key)
            found.append((path, metadata_captions(entry, subset), bucket, npz))
            continue
        if path is None:
            reason = "image not found (tried the key as a path and with each image extension, also under image_dir)"
            logger.warning(f"{subset.name}: skipping '{key}': {reason}")
            result.skipped.append((Path(key), reason))
            continue
        found.append((path, metadata_captions(entry, subset), bucket, npz))
    read = iter(_read_sizes([p for n, (p, *_) in enumerate(found) if n not in known]))
    for n, (path, captions, bucket, npz) in enumerate(found):
        size = known[n] if n in known else next(read)
        if n in known:
            result.records.append(ImageRecord(path, size, captions, subset_index, None, None, bucket, npz))
            continue
        if isinstance(size, str):
            logger.warning(f"{subset.name}: skipping {path}: {size}")
            result.skipped.append((path, size))
            continue
        mask = path.with_name(path.stem + MASK_SUFFIX)
        mask_path = mask if _is_file(mask) else None
        result.records.append(ImageRecord(path, size, captions, subset_index, mask_path, None, bucket, npz))
    with_bucket = sum(r.bucket is not None for r in result.records)
    if with_bucket:
        logger.info(f"{subset.name}: {with_bucket} image(s) use the metadata's train_resolution as their bucket")
    return result


def scan_subset(subset: SubsetConfig, subset_index: int) -> ScanResult:
    """Images of one subset; a subset that yields no usable image is a UserError."""
    result = _scan_metadata(subset, subset_index) if subset.metadata_file else _scan_folder(subset, subset_index)
    if not result.records:
        where = subset.metadata_file or subset.image_dir
        looked = ", ".join(image_extensions())
        extra = f"; {len(result.skipped)} file(s) could not be used" if result.skipped else ""
        raise UserError(f"{subset.name}: no images found in '{where}' (looked for {looked}){extra}")
    return result


def scan_dataset(dataset: DatasetConfig) -> ScanResult:
    """Images of every subset of ``dataset``; ``ImageRecord.subset_index`` points into ``dataset.subsets``."""
    total = ScanResult()
    seen: dict[Path | None, str] = {}
    for index, subset in enumerate(dataset.subsets):
        source = subset.metadata_file or subset.image_dir
        if source in seen:
            logger.warning(f"{subset.name}: ignored because it uses the same {source} as {seen[source]}")
            continue
        seen[source] = subset.name
        part = scan_subset(subset, index)
        total.records.extend(part.records)
        total.skipped.extend(part.skipped)
        total.caption_sources.update(part.caption_sources)
        if samples_per_epoch(subset, len(part.records)) == 0:
            logger.warning(
                f"{subset.name}: {describe_balancing(subset, len(part.records))}; this subset will not be trained on"
            )
    return total


def summary(datasets: list[DatasetConfig], scans: list[ScanResult]) -> str:
    """A few lines per subset: folder, images, repeats, reg or not, captions found and how many fall back."""
    lines = []
    for dataset, scan in zip(datasets, scans):
        width, height = dataset.resolution
        lines.append(
            f"{dataset.name} ({dataset.style}): batch size {dataset.batch_size}, resolution {width}x{height}, "
            f"buckets {'on' if dataset.enable_bucket else 'off'}"
        )
        for index, subset in enumerate(dataset.subsets):
            records = [r for r in scan.records if r.subset_index == index]
            with_caption = sum(1 for r in records if r.captions)
            fallback = len(records) - with_caption
            kind = "reg" if subset.is_reg else "train"
            source = scan.caption_sources.get(index, subset.caption_extension)
            fallback_text = f"'{subset.class_tokens}'" if subset.class_tokens else "empty caption"
            lines.append(
                f"  {subset.name}: {subset.metadata_file or subset.image_dir} | {len(records)} images x "
                f"{subset.num_repeats:g} repeats | {kind} | captions ({source}): {with_caption} found, "
                f"{fallback} use {fallback_text}"
            )
    return "\n".join(lines)
