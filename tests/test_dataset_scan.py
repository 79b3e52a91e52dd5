"""Scanning subsets on disk: image formats, header sizes, captions (.caption, .txt fallback, wildcard lines),
masks, corrupt files, fine-tuning metadata (.json/.jsonl, tags), cache_info, speed, and the summary text."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from library.dataset.scan import INFO_CACHE_FILE, scan_dataset, scan_subset, summary
from library.dataset.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import UserError
from tests.images import write_image


def subset_for(folder: Path, **kw) -> SubsetConfig:
    return SubsetConfig(name="datasets[0].subsets[0]", image_dir=folder, **kw)


def test_formats_sizes_and_captions(tmp_path):
    write_image(tmp_path / "a.png", (40, 30))
    write_image(tmp_path / "b.jpg", (24, 48))
    write_image(tmp_path / "c.jpeg", (16, 16))
    write_image(tmp_path / "d.webp", (20, 10))
    write_image(tmp_path / "e.bmp", (8, 12))
    write_image(tmp_path / "f.JPG", (10, 20))
    write_image(tmp_path / "g.gif", (10, 10))  # not a training format
    (tmp_path / "a.caption").write_text("a red fox, forest\nsecond line\n")
    (tmp_path / "b.caption").write_text("\n")
    (tmp_path / "notes.txt").write_text("not a caption")
    result = scan_subset(subset_for(tmp_path, class_tokens="sks"), 3)
    got = [(r.path.name, r.size, r.captions, r.subset_index, r.mask_path) for r in result.records]
    assert got == [
        ("a.png", (40, 30), ("a red fox, forest",), 3, None),
        ("b.jpg", (24, 48), (), 3, None),
        ("c.jpeg", (16, 16), (), 3, None),
        ("d.webp", (20, 10), (), 3, None),
        ("e.bmp", (8, 12), (), 3, None),
        ("f.JPG", (10, 20), (), 3, None),
    ]
    assert result.skipped == [] and result.caption_sources == {3: ".caption"}


def test_wildcard_reads_every_nonempty_line(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("first\n\n  second  \nthird\n")
    (record,) = scan_subset(subset_for(tmp_path, enable_wildcard=True), 0).records
    assert record.captions == ("first", "second", "third")


def test_face_crop_name_uses_base_caption(tmp_path):
    write_image(tmp_path / "portrait_10_20_30_40.png")
    (tmp_path / "portrait.caption").write_text("a face")
    (record,) = scan_subset(subset_for(tmp_path), 0).records
    assert record.captions == ("a face",)


def test_txt_fallback_when_no_caption_files(tmp_path, caplog):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("from txt")
    subset = subset_for(tmp_path)
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        result = scan_subset(subset, 0)
    assert [r.captions for r in result.records] == [("from txt",), ()]
    assert result.caption_sources == {0: ".txt"}
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        f"datasets[0].subsets[0]: no '.caption' caption files in {tmp_path}; using the .txt files found there"
    ]


def test_no_txt_fallback_when_caption_files_exist(tmp_path):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "a.caption").write_text("from caption")
    (tmp_path / "b.txt").write_text("from txt")
    result = scan_subset(subset_for(tmp_path), 0)
    assert [r.captions for r in result.records] == [("from caption",), ()]
    assert result.caption_sources == {0: ".caption"}


def test_corrupt_image_skipped_with_one_warning(tmp_path, caplog):
    write_image(tmp_path / "good.png", (32, 16))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        result = scan_subset(subset_for(tmp_path), 0)
    assert [(r.path.name, r.size) for r in result.records] == [("good.png", (32, 16))]
    assert [p.name for p, _ in result.skipped] == ["broken.png", "empty.jpg"]
    assert all(reason.startswith("cannot read image: ") for _, reason in result.skipped)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"datasets[0].subsets[0]: skipping {tmp_path / 'broken.png'}: cannot read image")
    assert warnings[1].startswith(f"datasets[0].subsets[0]: skipping {tmp_path / 'empty.jpg'}: cannot read image")


def test_mask_files_pair_and_are_not_images(tmp_path):
    write_image(tmp_path / "a.png", (16, 16))
    write_image(tmp_path / "a-masklabel.png", (16, 16), mode="L")
    write_image(tmp_path / "b.jpg", (16, 16))
    write_image(tmp_path / "orphan-masklabel.png", (16, 16), mode="L")
    records = scan_subset(subset_for(tmp_path), 0).records
    assert [(r.path.name, r.mask_path) for r in records] == [("a.png", tmp_path / "a-masklabel.png"), ("b.jpg", None)]


def test_subset_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UserError) as info:
        scan_subset(subset_for(tmp_path), 0)
    assert str(info.value).startswith(
        f"datasets[0].subsets[0]: no images found in '{tmp_path}' (looked for .png, .jpg, .jpeg, .webp, .bmp"
    )
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError) as info:
        scan_subset(subset_for(tmp_path), 0)
    assert str(info.value).endswith("; 1 file(s) could not be used")


def test_non_utf8_caption_is_an_error(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_bytes(b"caf\xe9")
    with pytest.raises(UserError) as info:
        scan_subset(subset_for(tmp_path), 0)
    assert (
        str(info.value)
        == f"{tmp_path / 'a.caption'}: caption file is not UTF-8 text (byte 3 is 0xe9); re-save it as UTF-8"
    )


def test_finetune_json_metadata(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_image(images / "one.png", (20, 30))
    write_image(images / "two.jpg", (30, 20))
    write_image(images / "sub" / "three.webp", (10, 10))
    outside = write_image(tmp_path / "elsewhere" / "four.png", (12, 12))
    write_image(images / "one-masklabel.png", (20, 30), mode="L")
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "one": {"caption": "a cat", "tags": "cute, fluffy"},
                "two.jpg": {"tags": "dog, grass"},
                "sub/three": {"caption": "a bird", "tags": ""},
                str(outside): {"caption": "absolute"},
                "missing": {"caption": "nothing"},
            }
        )
    )
    subset = SubsetConfig(name="--in_json", metadata_file=meta, image_dir=images)
    monkeypatch.chdir(tmp_path)
    result = scan_subset(subset, 0)
    got = [(r.path, r.size, r.captions, r.mask_path) for r in result.records]
    assert got == [
        (images / "one.png", (20, 30), ("a cat,cute, fluffy",), images / "one-masklabel.png"),
        (images / "two.jpg", (30, 20), ("dog, grass",), None),
        (images / "sub" / "three.webp", (10, 10), ("a bird",), None),
        (outside, (12, 12), ("absolute",), None),
    ]
    assert [(str(p), r.split(" (")[0]) for p, r in result.skipped] == [("missing", "image not found")]
    assert result.caption_sources == {0: "metadata"}


def test_finetune_metadata_errors(tmp_path):
    write_image(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    subset = SubsetConfig(name="s", metadata_file=meta, image_dir=tmp_path)
    for text, message in [
        ('{"a": {"tags": ["x", "y"]}}', f"{meta}: 'a': 'tags' must be a string"),
        ('["a"]', f'{meta}: metadata must be a JSON object {{image_key: {{"caption": ..., "tags": ...}}}}'),
        (
            '{"a": {"caption": "x",}}',
            f"{meta}: JSON syntax error at line 1, column 23: Expecting property name enclosed in double quotes",
        ),
    ]:
        meta.write_text(text)
        with pytest.raises(UserError) as info:
            scan_subset(subset, 0)
        assert str(info.value) == message


def test_finetune_wildcard_appends_tags_to_each_line(tmp_path):
    write_image(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "line one\n\nline two", "tags": "x\ny"}}))
    subset = SubsetConfig(name="s", metadata_file=meta, image_dir=tmp_path, enable_wildcard=True)
    (record,) = scan_subset(subset, 0).records
    assert record.captions == ("line one,x,y", "line two,x,y")


def test_finetune_jsonl_metadata(tmp_path):
    write_image(tmp_path / "a.png", (16, 8))
    write_image(tmp_path / "b.png", (8, 16))
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        '{"file_name": "a.png", "text": "hf style"}\n\n{"image_key": "b", "caption": "kohya", "tags": "t"}\n'
    )
    subset = SubsetConfig(name="s", metadata_file=meta, image_dir=tmp_path)
    records = scan_subset(subset, 0).records
    assert [(r.path.name, r.size, r.captions) for r in records] == [
        ("a.png", (16, 8), ("hf style",)),
        ("b.png", (8, 16), ("kohya,t",)),
    ]
    meta.write_text('{"file_name": "a.png"}\n{"text": "no key"}\n')
    with pytest.raises(UserError) as info:
        scan_subset(subset, 0)
    assert str(info.value) == f"{meta}: line 2: needs an 'image_key', 'file_name' or 'image_path' field"


def test_cache_info_writes_and_reuses_sd_scripts_cache(tmp_path):
    write_image(tmp_path / "a.png", (24, 16))
    (tmp_path / "a.caption").write_text("cached caption")
    subset = subset_for(tmp_path, cache_info=True)
    scan_subset(subset, 0)
    cache = json.loads((tmp_path / INFO_CACHE_FILE).read_text())
    assert cache == {str(tmp_path / "a.png"): {"caption": "cached caption", "resolution": [24, 16]}}
    # sd-scripts trusts the cache for files it lists: an edited caption is not re-read, a new image is scanned.
    (tmp_path / "a.caption").write_text("edited")
    write_image(tmp_path / "b.png", (8, 8))
    records = scan_subset(subset, 0).records
    assert [(r.path.name, r.size, r.captions) for r in records] == [
        ("a.png", (24, 16), ("cached caption",)),
        ("b.png", (8, 8), ()),
    ]
    assert len(json.loads((tmp_path / INFO_CACHE_FILE).read_text())) == 2


def test_scan_dataset_indexes_subsets_and_summary(tmp_path, caplog):
    train, reg = tmp_path / "10_sls frog", tmp_path / "1_frog"
    write_image(train / "a.png")
    write_image(train / "b.png")
    (train / "a.caption").write_text("sls frog on a leaf")
    write_image(reg / "r.png")
    subsets = (
        SubsetConfig(name="--train_data_dir 10_sls frog", image_dir=train, num_repeats=10, class_tokens="sls frog"),
        SubsetConfig(name="--reg_data_dir 1_frog", image_dir=reg, is_reg=True, class_tokens="frog"),
        SubsetConfig(name="tiny", image_dir=reg, num_repeats=0.1),
    )
    dataset = DatasetConfig(name="datasets[0]", style="dreambooth", subsets=subsets, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        scan = scan_dataset(dataset)
    assert [(r.path.name, r.subset_index) for r in scan.records] == [("a.png", 0), ("b.png", 0), ("r.png", 1)]
    assert [r.getMessage() for r in caplog.records] == [
        f"tiny: ignored because it uses the same {reg} as --reg_data_dir 1_frog"
    ]
    assert summary([dataset], [scan]) == (
        "datasets[0] (dreambooth): batch size 2, resolution 512x512, buckets off\n"
        f"  --train_data_dir 10_sls frog: {train} | 2 images x 10 repeats | train | captions (.caption): 1 found, "
        "1 use 'sls frog'\n"
        f"  --reg_data_dir 1_frog: {reg} | 1 images x 1 repeats | reg | captions (.caption): 0 found, 1 use 'frog'\n"
        f"  tiny: {reg} | 0 images x 0.1 repeats | train | captions (.caption): 0 found, 0 use empty caption"
    )


def test_zero_samples_warning(tmp_path, caplog):
    write_image(tmp_path / "a.png")
    subset = SubsetConfig(name="few", image_dir=tmp_path, num_repeats=0.5)
    dataset = DatasetConfig(name="d", style="dreambooth", subsets=(subset,))
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        scan_dataset(dataset)
    assert [r.getMessage() for r in caplog.records] == [
        "few: 1 images x 0.5 repeats = 0 samples/epoch; this subset will not be trained on"
    ]


def test_scanning_ten_thousand_images_takes_seconds(tmp_path):
    folder = tmp_path / "many"
    first = write_image(folder / "00000.png", (64, 48))
    for i in range(1, 10_000):
        os.link(first, folder / f"{i:05d}.png")  # a real PNG under 10,000 names, quick to create
        if i % 2:
            (folder / f"{i:05d}.caption").write_text("tag")
    wall, cpu = time.perf_counter(), time.process_time()
    records = scan_subset(subset_for(folder), 0).records
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(records) == 10_000 and sum(1 for r in records if r.captions) == 5_000
    assert all(r.size == (64, 48) for r in records)
    assert isinstance(records[0], ImageRecord)
    # CPU time, not wall time: the check must hold on a loaded machine (about 1 s of CPU here when idle)
    assert cpu < 6, f"scan used {cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_read_size_follows_exif_rotation(tmp_path):
    from PIL import Image

    from library.dataset.scan import read_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    Image.new("RGB", (64, 32), "red").save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (64, 32), "red").save(tmp_path / "plain.jpg")
    assert read_size(tmp_path / "rotated.jpg") == (32, 64)
    assert read_size(tmp_path / "plain.jpg") == (64, 32)


def test_kohya_folder_name_captions_are_not_overridden_by_txt(tmp_path, caplog):
    # kohya_ss writes caption_extension = ".none-use-foldername": no caption file matches, so sd-scripts captions
    # every image with the class tokens; the .txt fallback must not kick in.
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt")
    for ext in (".none-use-foldername", ".cap"):
        subset = subset_for(tmp_path, caption_extension=ext, class_tokens="sls frog")
        result = scan_subset(subset, 0)
        assert [r.captions for r in result.records] == [()]
        assert result.caption_sources == {0: ext}
        assert (
            summary([DatasetConfig("datasets[0]", "dreambooth", (subset,))], [result])
            .splitlines()[1]
            .endswith(f"captions ({ext}): 0 found, 1 use 'sls frog'")
        )


def test_cache_info_stores_class_tokens_for_missing_captions_as_sd_scripts(tmp_path):
    write_image(tmp_path / "a.png", (24, 16))
    scan_subset(subset_for(tmp_path, cache_info=True, class_tokens="sls frog"), 0)
    cache = json.loads((tmp_path / INFO_CACHE_FILE).read_text(encoding="utf-8"))
    assert cache == {str(tmp_path / "a.png"): {"caption": "sls frog", "resolution": [24, 16]}}


def test_unreadable_and_non_utf8_text_files_are_one_line_errors(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_bytes(b'{"a": {"caption": "caf\xe9"}}')
    subset = SubsetConfig(name="datasets[0].subsets[0]", image_dir=tmp_path, metadata_file=meta)
    with pytest.raises(UserError) as info:
        scan_subset(subset, 0)
    assert str(info.value) == f"{meta}: metadata file is not UTF-8 text (byte 22 is 0xe9); re-save it as UTF-8"
    (tmp_path / "a.caption").write_text("fine")
    real_read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:  # the tests run as root, where chmod cannot make a file unreadable
        if self.suffix == ".caption":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError) as info:
        scan_subset(subset_for(tmp_path), 0)
    assert str(info.value) == f"{tmp_path / 'a.caption'}: cannot read caption file (Permission denied)"
