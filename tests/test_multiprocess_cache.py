"""Latent caching split across two real processes (gloo on the CPU): each image is encoded once, by one process,
and every process ends with the caches a one-process run makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from library.dataset.latent_cache import cache_latents_shared, load_entry
from library.dataset.loader import TrainDataset, attach_latent_cache
from library.dataset.scan import scan_dataset
from library.dataset.types import DatasetConfig, SubsetConfig
from tests.training import write_captioned_images

SIZES = [(64, 64), (128, 64), (64, 64), (96, 64), (64, 128)]


class CountingVAE(torch.nn.Module):
    """The real VAE, counting the images it encodes (the cache identifies it by its weights, not this wrapper)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.images: list[int] = []

    def encode(self, x: torch.Tensor):
        self.images.append(x.shape[0])
        return self.inner.encode(x)


def make_dataset(image_dir: Path) -> TrainDataset:
    subset = SubsetConfig(name="frog", image_dir=image_dir, caption_extension=".txt")
    config = DatasetConfig(
        name="datasets[0]",
        style="dreambooth",
        subsets=(subset,),
        resolution=(128, 128),
        enable_bucket=True,
        bucket_no_upscale=True,
        min_bucket_reso=64,
        max_bucket_reso=128,
    )
    return TrainDataset([config], [scan_dataset(config).records], seed=0)


def latents_of(train: TrainDataset) -> dict[tuple[int, int], torch.Tensor]:
    return {key: load_entry(entry).latents for key, entry in train.latents.items()}


def _worker(rank: int, world: int, root: Path) -> None:
    """One process of the run: cache in memory (shared with all_gather_object), then on disk (with a barrier)."""
    import torch.distributed as dist

    from library.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=world)

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    try:
        results = {}
        for mode in ("memory", "disk"):
            vae = CountingVAE(make_tiny_model(seed=0).vae)
            train = attach_latent_cache(
                make_dataset(root / "images"),
                vae,
                to_disk=mode == "disk",
                progress=False,
                process_index=rank,
                num_processes=world,
                barrier=dist.barrier,
                gather=gather,
            )
            results[mode] = {"encoded": sum(vae.images), "latents": latents_of(train), "paths": train.records}
            dist.barrier()
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def image_root(tmp_path) -> Path:
    write_captioned_images(tmp_path / "images", ["a frog"] * len(SIZES), sizes=SIZES)
    return tmp_path


def test_two_processes_encode_each_image_once_and_match_one_process(image_root):
    from library.models.tiny import make_tiny_model

    vae = CountingVAE(make_tiny_model(seed=0).vae)
    single = attach_latent_cache(make_dataset(image_root / "images"), vae, to_disk=False, progress=False)
    reference = latents_of(single)
    assert sum(vae.images) == len(SIZES) == len(reference)
    assert not list((image_root / "images").glob("*.npz"))

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork: the children inherit the imported libraries instead of spending seconds importing them again
    torch.multiprocessing.start_processes(_worker, args=(2, image_root), nprocs=2, start_method="fork")
    ranks = [torch.load(image_root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for mode in ("memory", "disk"):
        # jobs are dealt round-robin: rank 0 encodes jobs 0, 2, 4 and rank 1 jobs 1, 3; none encodes twice
        assert [ranks[r][mode]["encoded"] for r in (0, 1)] == [3, 2], mode
        for r in (0, 1):
            got = ranks[r][mode]["latents"]
            assert got.keys() == reference.keys()
            for key in reference:
                assert torch.equal(got[key], reference[key]), (mode, r, key)
            assert ranks[r][mode]["paths"] == single.records
    assert len(list((image_root / "images").glob("*_sd.npz"))) == len(SIZES)


def test_disk_cache_needs_a_barrier_with_several_processes(image_root):
    with pytest.raises(ValueError, match="needs a barrier"):
        cache_latents_shared([], torch.nn.Identity(), to_disk=True, process_index=0, num_processes=2)
