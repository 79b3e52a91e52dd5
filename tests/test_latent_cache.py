"""Latent cache: file format, reuse without the VAE, invalidation, recovery and refusal, with the real tiny VAE."""

from __future__ import annotations

import logging
import os
import random
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from library.dataset.buckets import crop_ltrb
from library.dataset.images import prepare_image
from library.dataset.latent_cache import (
    CacheJob,
    cache_latents,
    content_hash,
    job_key,
    npz_path_for,
    read_npz,
    refuse_incompatible,
)
from library.dataset.types import DatasetConfig, SubsetConfig
from library.errors import UserError
from library.models.tiny import make_tiny_model, tiny_vae_config
from tests.images import write_image


class CountingVAE(torch.nn.Module):
    """The real VAE, counting how often (and on how many images) ``encode`` runs."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.images = 0

    def encode(self, x: torch.Tensor):
        self.calls += 1
        self.images += x.shape[0]
        return self.inner.encode(x)


@pytest.fixture(scope="module")
def vae():
    return make_tiny_model(seed=0).vae


def _jobs(tmp_path: Path, flip_aug: bool = False) -> list[CacheJob]:
    sizes = [(64, 64), (64, 64), (80, 64)]
    jobs = []
    for n, size in enumerate(sizes):
        path = write_image(tmp_path / f"img{n}.png", size, seed=n)
        jobs.append(CacheJob(path, (64, 64), (80, 64) if size == (80, 64) else (64, 64), size, flip_aug=flip_aug))
    return jobs


def test_disk_cache_format_and_values(tmp_path, vae):
    jobs = _jobs(tmp_path, flip_aug=True)
    counting = CountingVAE(vae)
    report = cache_latents(jobs, counting, to_disk=True, batch_size=2, progress=False)
    assert report.encoded == 3 and report.reused == 0
    assert counting.calls == 4  # 3 images in one bucket, batches of 2 -> 2 batches, each also encoded flipped
    path = tmp_path / "img2_0080x0064_sd.npz"
    assert npz_path_for(jobs[2].path, (80, 64)) == path and report.entries[2] == path
    with np.load(path) as z:
        assert set(z.files) == {"latents", "latents_flipped", "original_size", "crop_ltrb", "cache_key", "content_hash"}
        assert z["latents"].shape == (4, 8, 8) and z["latents"].dtype == np.float32
        assert z["original_size"].tolist() == [80, 64]
        assert z["crop_ltrb"].tolist() == list(crop_ltrb((64, 64), (80, 64)))
    entry, _ = read_npz(path)
    pixels = prepare_image(jobs[2].path, (64, 64), (80, 64), random.Random(0)).image[None]
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        flipped = vae.encode(pixels.flip(3)).latent_dist
    # unscaled samples of the image's own distribution: within 6 std of the mean, and not the mean itself
    assert ((entry.latents - dist.mean[0]).abs() <= 6 * dist.std[0] + 1e-5).all()
    assert not torch.allclose(entry.latents, dist.mean[0])
    assert ((entry.latents_flipped - flipped.mean[0]).abs() <= 6 * flipped.std[0] + 1e-5).all()


def test_latents_do_not_depend_on_batching_or_mode(tmp_path, vae):
    jobs = _jobs(tmp_path)
    one = cache_latents(jobs, vae, to_disk=False, batch_size=1, progress=False)
    three = cache_latents(jobs, vae, to_disk=False, batch_size=3, progress=False)
    disk = cache_latents(jobs, vae, to_disk=True, batch_size=2, progress=False)
    for i in range(3):
        a, b = one.entries[i].latents, three.entries[i].latents
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(a, read_npz(disk.entries[i])[0].latents, atol=1e-5)


def test_latents_do_not_depend_on_folder_or_file_times(tmp_path, vae, one_torch_thread):
    jobs = _jobs(tmp_path / "a")
    copies = []
    for job in jobs:
        copy = tmp_path / "b" / job.path.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(job.path.read_bytes())
        os.utime(copy, ns=(job.path.stat().st_mtime_ns + 10**9,) * 2)
        copies.append(replace(job, path=copy))
    first = cache_latents(jobs, vae, to_disk=False, batch_size=3, progress=False)
    second = cache_latents(copies, vae, to_disk=False, batch_size=3, progress=False)
    for i in range(3):
        assert torch.equal(first.entries[i].latents, second.entries[i].latents)


def test_second_run_reuses_without_vae(tmp_path, vae):
    jobs = _jobs(tmp_path)
    cache_latents(jobs, vae, to_disk=True, batch_size=2, progress=False)
    counting = CountingVAE(vae)
    again = cache_latents(jobs, counting, to_disk=True, batch_size=2, progress=False)
    assert counting.calls == 0 and again.reused == 3 and again.encoded == 0
    assert again.entries == {i: npz_path_for(j.path, j.original_size) for i, j in enumerate(jobs)}


def test_edit_in_place_invalidates_only_that_image(tmp_path, vae):
    jobs = _jobs(tmp_path)
    counting = CountingVAE(vae)
    cache_latents(jobs, counting, to_disk=True, progress=False)
    before = read_npz(npz_path_for(jobs[1].path, (64, 64)))[0].latents
    write_image(jobs[1].path, (64, 64), seed=99)  # same name, new content
    counting.calls = counting.images = 0
    report = cache_latents(jobs, counting, to_disk=True, progress=False)
    assert report.stale == 1 and report.reused == 2 and counting.images == 1
    after = read_npz(npz_path_for(jobs[1].path, (64, 64)))[0].latents
    assert not torch.allclose(before, after)


def test_other_vae_or_settings_invalidate(tmp_path, vae):
    jobs = _jobs(tmp_path)
    cache_latents(jobs, vae, to_disk=True, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = AutoencoderKL(**tiny_vae_config()).eval()
    assert cache_latents(jobs, other, to_disk=True, progress=False).stale == 3
    flipped_jobs = [CacheJob(j.path, j.bucket, j.resized, j.original_size, flip_aug=True) for j in jobs]
    report = cache_latents(flipped_jobs, other, to_disk=True, progress=False)
    assert report.stale == 3 and report.encoded == 3


def test_truncated_npz_is_recomputed_with_warning(tmp_path, vae, caplog):
    jobs = _jobs(tmp_path)
    cache_latents(jobs, vae, to_disk=True, progress=False)
    path = npz_path_for(jobs[0].path, (64, 64))
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        report = cache_latents(jobs, vae, to_disk=True, progress=False)
    assert report.unreadable == 1 and report.encoded == 1 and report.reused == 2
    assert any(str(path) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert read_npz(path)[0].latents.shape == (4, 8, 8)


def test_skip_cache_check_trusts_existing_files(tmp_path, vae):
    jobs = _jobs(tmp_path)
    cache_latents(jobs, vae, to_disk=True, progress=False)
    write_image(jobs[0].path, (64, 64), seed=42)
    counting = CountingVAE(vae)
    report = cache_latents(jobs, counting, to_disk=True, skip_check=True, progress=False)
    assert counting.calls == 0 and report.reused == 3


def test_corrupt_image_is_reported_not_cached(tmp_path, vae, caplog):
    jobs = _jobs(tmp_path)
    jobs[1].path.write_bytes(b"broken" * 50)
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        report = cache_latents(jobs, vae, to_disk=True, progress=False)
    assert [e.path for e in report.failed] == [jobs[1].path]
    assert 1 not in report.entries and set(report.entries) == {0, 2}
    assert any(str(jobs[1].path) in r.getMessage() for r in caplog.records)


def test_no_temporary_files_left(tmp_path, vae):
    cache_latents(_jobs(tmp_path), vae, to_disk=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == [
        "img0_0064x0064_sd.npz",
        "img1_0064x0064_sd.npz",
        "img2_0080x0064_sd.npz",
    ]


@pytest.mark.parametrize("key", ["color_aug", "random_crop"])
def test_refused_with_random_augmentation(tmp_path, key):
    subset = SubsetConfig(name="datasets[0].subsets[1]", image_dir=tmp_path, **{key: True})
    dataset = DatasetConfig(name="datasets[0]", style="dreambooth", subsets=(SubsetConfig("s0", tmp_path), subset))
    with pytest.raises(UserError, match=rf"datasets\[0\]\.subsets\[1\]: {key} cannot be combined with --cache"):
        refuse_incompatible([dataset], "--cache_latents_to_disk")
    refuse_incompatible([DatasetConfig("d", "dreambooth", (SubsetConfig("s0", tmp_path, flip_aug=True),))])


def test_edit_in_place_with_size_and_mtime_restored_is_noticed(tmp_path, vae):
    jobs = [
        CacheJob(write_image(tmp_path / f"img{n}.bmp", (64, 64), seed=n), (64, 64), (64, 64), (64, 64)) for n in (0, 1)
    ]
    cache_latents(jobs, vae, to_disk=True, progress=False)
    before = read_npz(npz_path_for(jobs[1].path, (64, 64)))
    st = jobs[1].path.stat()
    write_image(jobs[1].path, (64, 64), seed=99)  # BMP: same size in bytes
    os.utime(jobs[1].path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert jobs[1].path.stat().st_size == st.st_size and jobs[1].path.stat().st_mtime_ns == st.st_mtime_ns
    assert job_key(jobs[1], "v") == job_key(CacheJob(jobs[1].path, (64, 64), (64, 64), (64, 64)), "v")
    counting = CountingVAE(vae)
    report = cache_latents(jobs, counting, to_disk=True, progress=False)
    assert report.stale == 1 and report.reused == 1 and counting.images == 1
    after = read_npz(npz_path_for(jobs[1].path, (64, 64)))
    assert after[1] == before[1]  # same settings key (and seed); the content hash differs
    assert not torch.allclose(before[0].latents, after[0].latents)


def test_content_hash_covers_image_mask_and_conditioning_bytes(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"image bytes")
    mask = tmp_path / "m.png"
    mask.write_bytes(b"mask bytes")
    plain = content_hash(CacheJob(image, (64, 64), (64, 64), (64, 64)))
    with_mask = content_hash(CacheJob(image, (64, 64), (64, 64), (64, 64), mask_path=mask))
    as_condition = content_hash(CacheJob(image, (64, 64), (64, 64), (64, 64), conditioning_path=mask))
    assert len({plain, with_mask, as_condition}) == 3
    crc_image, crc_mask = zlib.crc32(b"image bytes"), zlib.crc32(b"mask bytes")
    assert plain == f"crc32:{crc_image:08x}/11,-,-"
    assert with_mask == f"crc32:{crc_image:08x}/11,{crc_mask:08x}/10,-"
    mask.write_bytes(b"mask bytez")
    assert content_hash(CacheJob(image, (64, 64), (64, 64), (64, 64), mask_path=mask)) != with_mask
    assert content_hash(CacheJob(image, (64, 64), (64, 64), (64, 64))) == plain


def test_cache_file_without_content_hash_is_recomputed_once(tmp_path, vae):
    jobs = _jobs(tmp_path)
    cache_latents(jobs, vae, to_disk=True, progress=False)
    path = npz_path_for(jobs[0].path, (64, 64))
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "content_hash"}
    np.savez(path, **arrays)  # as written before content hashes existed
    counting = CountingVAE(vae)
    first = cache_latents(jobs, counting, to_disk=True, progress=False)
    second = cache_latents(jobs, counting, to_disk=True, progress=False)
    assert (first.stale, first.encoded, first.reused) == (1, 1, 2)
    assert (second.stale, second.encoded, second.reused) == (0, 0, 3) and counting.images == 1
    with np.load(path) as z:
        assert "content_hash" in z.files


@pytest.mark.parametrize("skip_check", [False, True])
def test_folder_where_the_cache_file_should_be_is_named(tmp_path, vae, skip_check):
    jobs = _jobs(tmp_path)
    blocker = npz_path_for(jobs[1].path, (64, 64))
    blocker.mkdir()
    counting = CountingVAE(vae)
    with pytest.raises(UserError) as caught:
        cache_latents(jobs, counting, to_disk=True, skip_check=skip_check, progress=False)
    assert str(caught.value) == (
        f"{blocker}: a folder is where this latent cache file should be written; remove or rename it and rerun"
    )
    assert counting.calls == 0 and blocker.is_dir()
