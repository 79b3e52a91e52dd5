"""finetune/prepare_buckets_latents.py on real images with the tiny VAE, and fine-tuning from its npz files (and from
npz files written the way sd-scripts writes them) without encoding images."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import fine_tune
import finetune.prepare_buckets_latents as script
from library.cli import run_cli
from library.config.dataset_config import DatasetFlags
from library.dataset.buckets import crop_ltrb
from library.dataset.loader import build_train_dataset
from library.models.load import load_model
from tests.images import write_image
from tests.training import run_args, write_dataset_toml

SIZES = [(64, 64), (96, 64), (64, 96)]
BUCKETS = [[64, 64], [64, 64], [32, 96]]  # area 64x64 in steps of 32: 96x64 -> 64x64 (ratio error .5 beats 96x32's 1.5)
BUCKET_FLAGS = ["--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128"]
BUCKET_FLAGS += ["--bucket_reso_steps", "32"]


class CountingVAE(torch.nn.Module):
    """The real tiny VAE, counting the images it encodes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def encode(self, x: torch.Tensor):
        self.images += x.shape[0]
        return self.inner.encode(x)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return load_model("tiny-sd1").vae


def write_data(root: Path) -> Path:
    """``root/img`` with p0..p2 (sizes SIZES), a corrupt bad.png, and ``root/meta.json`` captioning p0..p2."""
    folder = root / "img"
    for i, size in enumerate(SIZES):
        write_image(folder / f"p{i}.png", size=size, seed=i)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "meta.json").write_text(json.dumps({f"p{i}": {"caption": f"a cat {i}"} for i in range(3)}))
    return folder


def prepare(folder: Path, *extra: str, meta: Path | None = None) -> int:
    meta = meta or folder.parent / "meta.json"
    return run_cli(script.main, [str(folder), str(meta), str(meta), "tiny-sd1", *BUCKET_FLAGS, *extra])


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def summary_line(caplog) -> str:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare latents:")][-1]


def test_writes_sd_scripts_npz_layout_and_train_resolution(tmp_path, caplog):
    folder = write_data(tmp_path)
    with caplog.at_level(logging.INFO):
        assert prepare(folder, "--flip_aug") == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {f"p{i}": {"caption": f"a cat {i}", "train_resolution": BUCKETS[i]} for i in range(3)}
    assert sorted(p.name for p in folder.glob("*.npz")) == ["p0.npz", "p1.npz", "p2.npz"]
    for i, (size, (w, h)) in enumerate(zip(SIZES, BUCKETS)):
        z = arrays(folder / f"p{i}.npz")
        assert set(z) == {"latents", "latents_flipped", "original_size", "crop_ltrb", "cache_key", "content_hash"}
        assert z["latents"].dtype == z["latents_flipped"].dtype == np.float32
        assert z["latents"].shape == z["latents_flipped"].shape == (4, h // 8, w // 8)
        assert z["original_size"].tolist() == list(size)
        assert z["crop_ltrb"].tolist() == list(crop_ltrb((w, h), size))
        assert not np.array_equal(z["latents"], z["latents_flipped"])
    assert "3 processed, 0 skipped (already done), 1 failed, 3 written" in summary_line(caplog)
    assert any("bad.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_latents_are_bit_identical_to_the_training_cache(tmp_path, vae):
    folder = write_data(tmp_path)
    assert prepare(folder, "--flip_aug") == 0
    subset = {"image_dir": folder.as_posix(), "flip_aug": True}
    dataset = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128}
    config = write_dataset_toml(tmp_path / "db.toml", [{**dataset, "bucket_reso_steps": 32, "subsets": [subset]}])
    flags = DatasetFlags(dataset_config=str(config), cache_latents_to_disk=True)
    build_train_dataset(flags, {"dreambooth"}, vae, seed=0, progress=False)
    for i, (w, h) in enumerate(SIZES):
        ours, cache = arrays(folder / f"p{i}.npz"), arrays(folder / f"p{i}_{w:04d}x{h:04d}_sd.npz")
        assert ours.keys() == cache.keys()
        for key in ours:
            assert np.array_equal(ours[key], cache[key]), (i, key)


def test_skip_existing_resumes_and_reencodes_changed_images(tmp_path, caplog):
    folder = write_data(tmp_path)
    assert prepare(folder) == 0
    before = {i: arrays(folder / f"p{i}.npz")["latents"] for i in range(3)}
    (folder / "p2.npz").unlink()  # as if interrupted before p2
    write_image(folder / "p1.png", size=SIZES[1], seed=99)  # edited since
    with caplog.at_level(logging.INFO):
        assert prepare(folder, "--skip_existing") == 0
    assert "2 processed, 1 skipped (already done), 1 failed, 2 written" in summary_line(caplog)
    assert np.array_equal(arrays(folder / "p0.npz")["latents"], before[0])
    assert not np.array_equal(arrays(folder / "p1.npz")["latents"], before[1])
    assert np.array_equal(arrays(folder / "p2.npz")["latents"], before[2])  # same image, same latents
    with caplog.at_level(logging.INFO):
        assert prepare(folder, "--skip_existing") == 0
    assert "0 processed, 3 skipped (already done), 1 failed, 0 written" in summary_line(caplog)


def test_full_path_recursive_and_alpha_mask(tmp_path):
    folder = tmp_path / "img"
    write_image(folder / "a.png", size=(64, 64), seed=1, mode="RGBA")
    write_image(folder / "sub" / "b.png", size=(64, 64), seed=2, mode="RGBA")
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    assert prepare(folder, "--full_path", "--recursive", "--alpha_mask", meta=meta) == 0
    assert sorted(json.loads(meta.read_text())) == [str(folder / "a.png"), str(folder / "sub" / "b.png")]
    z = arrays(folder / "sub" / "b.npz")
    assert z["alpha_mask"].shape == (64, 64) and z["alpha_mask"].dtype == np.float32
    alpha = np.asarray(Image.open(folder / "sub" / "b.png"))[..., 3]
    assert np.allclose(z["alpha_mask"], alpha / 255.0)
    meta.write_text("{}")
    assert prepare(folder, "--recursive", meta=meta) == 0  # stems as keys: all npz files in the top folder
    assert sorted(json.loads(meta.read_text())) == ["a", "b"] and (folder / "b.npz").is_file()
    assert "alpha_mask" not in arrays(folder / "b.npz")


@pytest.mark.parametrize(
    "extra, start",
    [
        (["--max_resolution", "big"], "error: --max_resolution big: expected 'width,height'"),
        (["--bucket_reso_steps", "12"], "error: flags: bucket_reso_steps = 12 must be a positive multiple of 8"),
        (["--batch_size", "0"], "error: --batch_size 0: must be 1 or more"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, extra, start):
    folder = write_data(tmp_path)
    assert prepare(folder, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start)
    assert not list(folder.glob("*.npz"))


def test_fine_tune_trains_from_prepared_npz_without_the_vae(tmp_path, monkeypatch, caplog):
    folder = write_data(tmp_path)
    (folder / "bad.png").unlink()
    assert prepare(folder, "--flip_aug") == 0
    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or real(self, x, *a, **k)
    )
    argv = run_args(tmp_path / "out", name="ft", learning_rate="1e-3", seed=1, model="tiny-sd1")
    argv += ["--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(folder), "--flip_aug"]
    with caplog.at_level(logging.INFO):
        fine_tune.main([*argv, "--max_train_steps", "3", "--save_model_as", "safetensors"])
    assert calls == []
    assert (tmp_path / "out" / "ft.safetensors").is_file()
    lines = [r.getMessage() for r in caplog.records]
    assert (
        "latents: 3 of 3 images from prepared npz files (prepare_buckets_latents.py, no VAE needed); 0 set aside"
        in (lines)
    )
    assert any("latents from prepared npz files (prepare_buckets_latents.py): 3 of 3" in line for line in lines)


def in_json_flags(root: Path, **extra) -> DatasetFlags:
    return DatasetFlags(in_json=str(root / "meta.json"), train_data_dir=str(root / "img"), resolution="64", **extra)


def batch_latents(train) -> dict[str, torch.Tensor]:
    out = {}
    for plan in train.batch_plan(1):
        batch = train.load_batch(plan)
        assert batch["images"] is None
        out.update({Path(p).stem: lat for p, lat in zip(batch["paths"], batch["latents"])})
    return out


def test_changed_image_is_reencoded_never_reused(tmp_path, vae, caplog):
    folder = write_data(tmp_path)
    assert prepare(folder) == 0
    counting = CountingVAE(vae)
    train = build_train_dataset(in_json_flags(tmp_path, cache_latents=True), {"finetune"}, counting, seed=0)
    assert counting.images == 0 and [a.bucket for a in train.assignments[0]] == [tuple(b) for b in BUCKETS]
    got = batch_latents(train)
    for i in range(3):
        assert torch.equal(got[f"p{i}"], torch.from_numpy(arrays(folder / f"p{i}.npz")["latents"]))
    # edit p1 in place, keeping its size and modification time: only the content hash can tell
    image = folder / "p1.png"
    stat = image.stat()
    write_image(image, size=SIZES[1], seed=50)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        train = build_train_dataset(in_json_flags(tmp_path, cache_latents=True), {"finetune"}, counting, seed=0)
    assert counting.images == 1
    assert any("p1.npz: prepared latents not used: the image changed" in r.getMessage() for r in caplog.records)
    assert not torch.equal(batch_latents(train)["p1"], got["p1"])


def sd_scripts_npz(path: Path, size: tuple[int, int], bucket: tuple[int, int], seed: int) -> np.ndarray:
    """An npz exactly as sd-scripts' save_latents_to_disk wrote it (no cache_key/content_hash)."""
    latents = np.random.default_rng(seed).standard_normal((4, bucket[1] // 8, bucket[0] // 8)).astype(np.float32)
    np.savez(path, latents=latents, original_size=np.array(size), crop_ltrb=np.array(crop_ltrb(bucket, size)))
    return latents


def test_sd_scripts_npz_used_as_is_unless_the_image_is_newer(tmp_path, caplog):
    folder = write_data(tmp_path)
    meta = {f"p{i}": {"caption": "x", "train_resolution": BUCKETS[i]} for i in range(3)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    planted = {f"p{i}": sd_scripts_npz(folder / f"p{i}.npz", SIZES[i], tuple(BUCKETS[i]), i) for i in range(3)}
    old = (folder / "p0.npz").stat().st_mtime - 100
    for i in range(3):
        os.utime(folder / f"p{i}.png", (old, old))
    train = build_train_dataset(in_json_flags(tmp_path), {"finetune"}, None, seed=0)
    got = batch_latents(train)
    assert all(torch.equal(got[k], torch.from_numpy(v)) for k, v in planted.items())
    os.utime(folder / "p2.png", (old + 1000, old + 1000))
    (folder / "p0.png").unlink()  # gone: the npz alone is trained on, as sd-scripts allowed
    with caplog.at_level(logging.INFO):
        train = build_train_dataset(in_json_flags(tmp_path), {"finetune"}, None, seed=0)
    assert any("p2.npz: prepared latents not used: the image is newer" in r.getMessage() for r in caplog.records)
    assert sorted(train.latents) == [(0, 0), (0, 1)] and train.records[0][0].path == folder / "p0"
    assert train.records[0][0].size == SIZES[0]
    assert [a.bucket for a in train.assignments[0]] == [(64, 64), (64, 64), (32, 96)]


def test_image_gone_and_npz_unusable_is_skipped(tmp_path):
    folder = write_data(tmp_path)
    meta = {"p0": {"caption": "x", "train_resolution": [64, 64]}, "p1": {"caption": "y", "train_resolution": [64, 64]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sd_scripts_npz(folder / "p0.npz", SIZES[0], (32, 32), 0)  # wrong size for its train_resolution
    sd_scripts_npz(folder / "p1.npz", SIZES[1], (64, 64), 1)
    (folder / "p0.png").unlink()
    train = build_train_dataset(in_json_flags(tmp_path), {"finetune"}, None, seed=0)
    assert [r.path.name for r in train.records[0]] == ["p1.png"]
    assert train.skipped[-1][0] == folder / "p0" and "latents are for 32x32" in train.skipped[-1][1]
