"""Fine-tuning metadata JSON (``{image_key: {"caption": ..., "tags": ..., ...}}``): reading it, merging caption or
tag files into it, and writing it atomically, as sd-scripts' ``merge_captions_to_metadata.py`` and
``merge_dd_tags_to_metadata.py`` do.

An image key is the file stem (``photo`` for ``data/photo.png``), or with ``--full_path`` the image path as found
under the given folder (``data/sub/photo.png``: relative when the folder was given relative, as in sd-scripts).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from library.cli import ArgumentParser
from library.dataset.scan import read_text_file
from library.errors import UserError
from library.io import atomic_write_json
from library.prep.common import find_images, sidecar

logger = logging.getLogger("sdtrain.prep")


def image_key(image: Path, full_path: bool) -> str:
    """The metadata key of ``image``: its stem, or with ``full_path`` the path itself (extension included)."""
    return str(image) if full_path else image.stem


def read_metadata_json(path: Path, flag: str) -> dict[str, dict]:
    """An existing metadata file as a dict of entries; a missing, unreadable or malformed file is one line naming
    ``flag`` and the path."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: metadata file not found; check the path")
    text = read_text_file(path, "metadata file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{flag} {path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f'{flag} {path}: metadata must be a JSON object {{image_key: {{"caption": ...}}}}')
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{flag} {path}: entry '{key}' must be a JSON object, got {type(entry).__name__}")
    return data


def write_metadata(path: Path, metadata: dict[str, dict]) -> None:
    """Write the metadata atomically: until the new file is complete, the old one (even when it is the input) stays."""
    atomic_write_json(path, metadata)


@dataclass(frozen=True)
class MergeJob:
    """One run of a merge script: which side files go into which field of which metadata file."""

    train_data_dir: Path
    out_json: Path
    field: str  # "caption" or "tags"
    extension: str  # side file extension, e.g. ".caption" or ".txt"
    in_json: Path | None = None
    full_path: bool = False
    recursive: bool = False
    debug: bool = False


@dataclass
class MergeReport:
    """Counts for the closing line: images found, side files read, unreadable ones and entries written."""

    images: int = 0
    found: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    added: int = 0
    updated: int = 0
    entries: int = 0

    def summary(self, job: MergeJob) -> str:
        return (
            f"merge {job.field}: {self.images} images, {self.found} {job.extension} files found "
            f"({len(self.missing)} missing, {len(self.unreadable)} unreadable), {self.added} entries added, "
            f"{self.updated} updated; {self.entries} entries written to {job.out_json}"
        )


def merge_side_files(job: MergeJob) -> MergeReport:
    """Read each image's side file into ``metadata[key][field]`` (other fields and other entries are kept) and write
    ``out_json``. Without ``in_json``, an existing ``out_json`` is read and updated, as in sd-scripts."""
    if job.recursive and not job.full_path:
        raise UserError(
            "--recursive needs --full_path: images in different sub-folders may share a file name, and only the "
            "full path keeps their keys apart"
        )
    images = find_images(job.train_data_dir, job.recursive)
    if job.in_json is not None:
        metadata = read_metadata_json(job.in_json, "--in_json")
        logger.info("read %d entries from %s; their %s will be replaced", len(metadata), job.in_json, job.field)
    elif job.out_json.is_file():
        metadata = read_metadata_json(job.out_json, "out_json")
        logger.info("updating the %d entries of %s; their %s will be replaced", len(metadata), job.out_json, job.field)
    else:
        metadata = {}
    report = MergeReport(images=len(images))
    first_image: dict[str, Path] = {}
    for image in tqdm(images, desc=f"merge {job.field}", unit="img", dynamic_ncols=True):
        side = sidecar(image, job.extension)
        if not side.is_file():
            report.missing.append(str(image))
            continue
        try:
            text = read_text_file(side, f"{job.field} file").strip()
        except UserError as e:
            logger.warning("skipping %s", e)
            report.unreadable.append(str(side))
            continue
        report.found += 1
        key = image_key(image, job.full_path)
        if key in first_image:
            logger.warning(
                "%s and %s share the key '%s'; the later one wins (use --full_path)", first_image[key], image, key
            )
        first_image.setdefault(key, image)
        entry = metadata.get(key)
        if entry is None:
            metadata[key] = entry = {}
            report.added += 1
        else:
            report.updated += 1
        entry[job.field] = text
        if job.debug:
            logger.info("%s %s", key, text)
    if report.missing:
        logger.info(
            "%d images have no %s file (left out): %s",
            len(report.missing),
            job.extension,
            ", ".join(report.missing[:5]) + (", ..." if len(report.missing) > 5 else ""),
        )
    report.entries = len(metadata)
    write_metadata(job.out_json, metadata)
    logger.info(report.summary(job))
    return report


def merge_parser(description: str, target_field: str, default_extension: str, misspelt_alias: bool) -> ArgumentParser:
    """The flags both merge scripts take (sd-scripts' ``train_data_dir out_json [--in_json]`` and friends);
    ``misspelt_alias`` adds sd-scripts' old ``--caption_extention`` spelling where that script still accepts it."""
    what = "caption" if target_field == "caption" else "tag"
    parser = ArgumentParser(description=description)
    parser.add_argument("train_data_dir", type=str, help="folder of training images")
    parser.add_argument("out_json", type=str, help="metadata file to write")
    parser.add_argument(
        "--in_json", type=str, default=None, help="metadata file to read (default: out_json when it exists)"
    )
    if misspelt_alias:
        parser.add_argument(
            "--caption_extention", type=str, default=None, help="old misspelt name of --caption_extension"
        )
    parser.add_argument(
        "--caption_extension", type=str, default=default_extension, help=f"extension of the {what} files"
    )
    parser.add_argument(
        "--full_path", action="store_true", help="key entries by the image path instead of the file stem"
    )
    parser.add_argument("--recursive", action="store_true", help="also read sub-folders (needs --full_path)")
    parser.add_argument("--debug", action="store_true", help=f"log each key and its {what}s")
    return parser


def merge_from_flags(args: argparse.Namespace, target_field: str) -> None:
    """Run a merge script's parsed flags into ``target_field`` of the metadata."""
    misspelt = vars(args).get("caption_extention")
    merge_side_files(
        MergeJob(
            train_data_dir=Path(args.train_data_dir),
            out_json=Path(args.out_json),
            field=target_field,
            extension=misspelt if misspelt is not None else args.caption_extension,
            in_json=Path(args.in_json) if args.in_json is not None else None,
            full_path=args.full_path,
            recursive=args.recursive,
            debug=args.debug,
        )
    )
