"""The training dataset: deterministic per-bucket batch plans, batch loading, resume, workers, skips, debug."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from library.config.dataset_config import DatasetFlags, dataset_flags
from library.dataset.debug import debug_dataset
from library.dataset.epoch import epoch_samples
from library.dataset.loader import TrainDataset, attach_latent_cache, build_train_dataset
from library.dataset.summary import summarize_dataset
from library.dataset.types import DatasetConfig, ImageRecord, SubsetConfig
from library.engine.data import EpochLoader
from library.engine.schedule import make_run_plan
from library.errors import UserError
from library.models.tiny import make_tiny_model
from tests.images import write_image

SQUARE, WIDE = (64, 64), (120, 40)  # -> buckets 64x64 and 96x32 with the settings below


def _dataset(tmp_path: Path, batch_size: int = 2, **subset_options) -> tuple[DatasetConfig, list[ImageRecord]]:
    train_dir, reg_dir = tmp_path / "train", tmp_path / "reg"
    subsets = (
        SubsetConfig("datasets[0].subsets[0]", train_dir, num_repeats=2, **subset_options),
        SubsetConfig("datasets[0].subsets[1]", reg_dir, is_reg=True, class_tokens="dog"),
    )
    dataset = DatasetConfig(
        "datasets[0]",
        "dreambooth",
        subsets,
        batch_size=batch_size,
        resolution=(64, 64),
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
    )
    records = []
    for n in range(7):
        size = SQUARE if n % 2 == 0 else WIDE
        path = write_image(train_dir / f"t{n}.png", size, seed=n)
        records.append(ImageRecord(path, size, (f"sks, tag{n}, red, blue, green",), 0))
    for n in range(3):
        path = write_image(reg_dir / f"r{n}.png", SQUARE, seed=100 + n)
        records.append(ImageRecord(path, SQUARE, (), 1))
    return dataset, records


def _train(tmp_path, seed=7, **options) -> TrainDataset:
    dataset, records = _dataset(tmp_path, **options)
    return TrainDataset([dataset], [records], seed=seed, prior_loss_weight=0.25)


def test_batches_count_the_optimizer_steps_of_the_runs_plan(tmp_path):
    """Token warm-up counts optimizer steps (sd-scripts): with 2 processes accumulating 2 batches, 4 consecutive
    batches of the epoch make one step, and epoch 2 starts after the plan's steps of epoch 1 (a short group too)."""
    train = _train(tmp_path)
    batches = train.batches_in_epoch(1)
    plan = make_run_plan(batches, num_processes=2, accumulation=2, max_train_steps=100, max_train_epochs=None)
    planned = train.with_changes(plan=plan)
    assert [p.global_step for p in planned.batch_plan(1)] == [i // 4 for i in range(batches)]
    assert planned.batch_plan(2)[0].global_step == plan.steps_per_epoch == math.ceil(math.ceil(batches / 2) / 2)
    assert planned.max_train_steps == 100 and train.max_train_steps is None


def test_plan_is_deterministic_and_batches_stay_in_one_bucket(tmp_path):
    train = _train(tmp_path)
    plan = train.batch_plan(1)
    assert plan == _train(tmp_path).batch_plan(1)  # a fresh instance with the same seed: same plan
    assert plan != train.batch_plan(2)
    assert [p.global_step for p in plan] == list(range(len(plan)))
    assert [p.global_step for p in train.batch_plan(2)][0] == len(plan)
    records = train.records[0]
    for p in plan:
        assert 1 <= len(p.items) <= 2
        assert {train.assignments[0][i].bucket for i in p.items} == {p.bucket}
    assert {p.bucket for p in plan} == {(64, 64), (96, 32)}
    # exactly the samples of the epoch (7 train x 2 repeats + 14 reg to balance), each once
    planned = Counter(records[i].path for p in plan for i in p.items)
    expected = Counter(r.path for r in epoch_samples(train.datasets[0], records, 1, _dataset_seed(train)))
    assert planned == expected and sum(planned.values()) == 28
    # 3 wide images x 2 = 6 samples -> 3 batches; 4 square x 2 + 14 reg = 22 -> 11 batches
    assert Counter(p.bucket for p in plan) == {(96, 32): 3, (64, 64): 11}


def _dataset_seed(train: TrainDataset) -> int:
    from library.seeds import derive_seed

    return derive_seed(train.seed, "dataset", 0)


def test_other_seed_gives_other_order(tmp_path):
    assert _train(tmp_path, seed=1).batch_plan(1) != _train(tmp_path, seed=2).batch_plan(1)
    assert _train(tmp_path, seed=1).fingerprint() == _train(tmp_path, seed=1).fingerprint()
    assert _train(tmp_path, seed=1).fingerprint() != _train(tmp_path, seed=2).fingerprint()


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a["paths"] == b["paths"] and a["captions"] == b["captions"] and a["flipped"] == b["flipped"]
    assert tuple(a["bucket"]) == tuple(b["bucket"]) and a["global_step"] == b["global_step"]
    for key in ("images", "latents", "loss_weights", "network_multipliers", "alpha_masks"):
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert torch.equal(a[key], b[key]), key


def test_resumed_plan_slice_loads_the_same_batches(tmp_path):
    options = dict(flip_aug=True, random_crop=True, shuffle_caption=True, keep_tokens=1, color_aug=True)
    train = _train(tmp_path, **options)
    full = [train.load_batch(p) for p in train.batch_plan(2)]
    resumed_from = 5
    fresh = _train(tmp_path, **options)  # a new process after a restart: nothing shared but the seed
    resumed = [fresh.load_batch(p) for p in fresh.batch_plan(2)[resumed_from:]]
    for a, b in zip(full[resumed_from:], resumed):
        _assert_same_batch(a, b)
    assert len(resumed) == len(full) - resumed_from
    flips = [f for batch in full for f in batch["flipped"]]
    assert any(flips) and not all(flips)
    captions = {c for batch in full for c in batch["captions"] if c.startswith("sks")}
    assert len(captions) > 3  # shuffled differently per sample


def test_batch_contents(tmp_path):
    train = _train(tmp_path)
    plan = train.batch_plan(1)
    batch = train.load_batch(plan[0])
    b = len(plan[0].items)
    w, h = plan[0].bucket
    assert batch["images"].shape == (b, 3, h, w) and batch["latents"] is None
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert batch["alpha_masks"] is None and batch["bucket"] == (w, h)
    for p in plan:
        batch = train.load_batch(p)
        for path, weight, caption in zip(batch["paths"], batch["loss_weights"].tolist(), batch["captions"]):
            is_reg = "/reg/" in path
            assert weight == (0.25 if is_reg else 1.0)
            assert caption == ("dog" if is_reg else "sks, tag" + Path(path).stem[1:] + ", red, blue, green")
        assert batch["network_multipliers"].tolist() == [1.0] * len(p.items)


def test_data_loader_workers_give_the_same_batches(tmp_path):
    train = _train(tmp_path, flip_aug=True, random_crop=True, shuffle_caption=True)
    plans = train.batch_plan(1)[:6]
    in_process = [train.load_batch(p) for p in plans]
    loader = EpochLoader(train, workers=2)
    loaded = list(loader.epoch(plans))
    loader.close()
    assert len(loaded) == len(in_process)
    for a, b in zip(in_process, loaded):
        _assert_same_batch(a, b)


def test_corrupt_image_skipped_with_one_warning(tmp_path, caplog):
    train = _train(tmp_path, batch_size=4)
    broken = train.records[0][0].path
    broken.write_bytes(b"not a png" * 20)
    seen = []
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        for epoch in (1, 2):
            for p in train.batch_plan(epoch):
                batch = train.load_batch(p)
                assert str(broken) not in batch["paths"]
                assert batch["images"].shape[0] == len(batch["paths"])
                seen.extend(batch["skipped"])
    assert seen and set(seen) == {str(broken)}
    warnings = [r for r in caplog.records if str(broken) in r.getMessage()]
    assert len(warnings) == 1


def test_batch_of_only_broken_images_is_none(tmp_path):
    dataset, records = _dataset(tmp_path, batch_size=1)
    records[0].path.write_bytes(b"junk")
    train = TrainDataset([dataset], [records], seed=0)
    plan = next(p for p in train.batch_plan(1) if records[p.items[0]] == records[0])
    assert train.load_batch(plan) is None


def test_cached_latents_and_masks(tmp_path):
    dataset, records = _dataset(tmp_path, flip_aug=True, alpha_mask=True)
    mask = tmp_path / "train" / "t0-masklabel.png"
    write_image(mask, SQUARE, seed=5, mode="L")
    records[0] = ImageRecord(records[0].path, SQUARE, records[0].captions, 0, mask)
    train = TrainDataset([dataset], [records], seed=3)
    cached = attach_latent_cache(train, make_tiny_model().vae, to_disk=False, batch_size=4, progress=False)
    masked = 0
    for p in cached.batch_plan(1):
        batch = cached.load_batch(p)
        w, h = p.bucket
        assert batch["images"] is None and batch["latents"].shape == (len(p.items), 4, h // 8, w // 8)
        for n, i in enumerate(p.items):
            entry = cached.latents[(0, i)]
            expected = entry.latents_flipped if batch["flipped"][n] else entry.latents
            assert torch.equal(batch["latents"][n], expected)
        uncached = train.load_batch(p)
        assert uncached["flipped"] == batch["flipped"]
        if all(cached.records[0][i].subset_index == 1 for i in p.items):  # only the train subset has alpha_mask
            assert batch["alpha_masks"] is None and uncached["alpha_masks"] is None
            continue
        assert batch["alpha_masks"].shape == (len(p.items), 1, h, w)
        assert torch.allclose(batch["alpha_masks"], uncached["alpha_masks"])  # flipped along with the latents
        for n, i in enumerate(p.items):
            if cached.records[0][i] == records[0]:  # the one with a mask file: not all ones
                masked += 1
                assert batch["alpha_masks"][n].min() < 0.5
    assert masked == 2  # t0 x 2 repeats


def test_summary_lists_buckets(tmp_path):
    text = summarize_dataset(_train(tmp_path)).text
    assert "images: 7 train, 3 regularization, in 1 dataset(s)" in text
    assert "    64x64          7             22" in text
    assert "    96x32          3              6" in text
    assert "batches per epoch: 14 (epoch 1)" in text


def test_debug_dataset_prints_and_writes_pngs(tmp_path):
    train = _train(tmp_path, flip_aug=True)
    lines: list[str] = []
    out = tmp_path / "debug"
    written = debug_dataset(train, out_dir=out, max_batches=2, print_fn=lines.append)
    plans = train.batch_plan(1)[:2]
    assert len(written) == sum(len(p.items) for p in plans)
    assert all(p.suffix == ".png" and p.is_file() for p in written)
    text = "\n".join(lines)
    assert f"bucket {plans[0].bucket[0]}x{plans[0].bucket[1]}" in text and "caption:" in text


def test_build_train_dataset_from_flags(tmp_path):
    img_dir = tmp_path / "data" / "3_sks dog"
    for n in range(3):
        write_image(img_dir / f"a{n}.png", SQUARE, seed=n)
    from library.config.flags import add_dataset_arguments

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(
        ["--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--cache_latents_to_disk", "--seed", "5"]
    )
    train = build_train_dataset(dataset_flags(args), {"dreambooth"}, make_tiny_model().vae, seed=5, progress=False)
    assert train.seed == 5 and len(train.records[0]) == 3
    assert sorted(p.name for p in img_dir.glob("*.npz")) == [f"a{n}_0064x0064_sd.npz" for n in range(3)]
    batch = train.load_batch(train.batch_plan(1)[0])
    assert batch["latents"].shape == (1, 4, 8, 8) and batch["captions"] == ["sks dog"]


def test_epochs_count_from_one(tmp_path):
    with pytest.raises(ValueError):
        _train(tmp_path).batch_plan(0)


@pytest.mark.parametrize("masked_loss", [False, True])
def test_mask_files_weight_the_loss_only_with_masked_loss(tmp_path, masked_loss, caplog):
    from PIL import Image

    from library.config.flags import add_dataset_arguments
    from library.config.train_flags import add_loss_arguments

    img_dir = tmp_path / "data" / "1_cat"
    write_image(img_dir / "a.png", SQUARE)
    mask = np.zeros((SQUARE[1], SQUARE[0]), np.uint8)
    mask[:, : SQUARE[0] // 2] = 255
    Image.fromarray(mask).save(img_dir / "a-masklabel.png")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    add_loss_arguments(parser)
    argv = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--seed", "1"]
    args = parser.parse_args(argv + (["--masked_loss"] if masked_loss else []))
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        train = build_train_dataset(dataset_flags(args), {"dreambooth"}, seed=1, progress=False)
    masks = train.load_batch(train.batch_plan(1)[0])["alpha_masks"]
    if masked_loss:
        assert masks.shape == (1, 1, 64, 64)
        assert masks[0, 0, :, :32].min() == 1.0 and masks[0, 0, :, 32:].max() == 0.0
    else:
        assert masks is None
        assert "1 mask file(s) <stem>-masklabel.png found; pass --masked_loss" in caplog.text


CUSTOM_DATASET = '''
from library.dataset.loader import TrainDataset


class Tagged(TrainDataset):
    """Every batch says where it came from."""

    def load_batch(self, plan):
        batch = super().load_batch(plan)
        batch["source"] = "tagged"
        return batch
'''


def test_dataset_class_swaps_in_a_train_dataset_subclass(tmp_path, monkeypatch):
    (tmp_path / "my_datasets.py").write_text(CUSTOM_DATASET)
    monkeypatch.chdir(tmp_path)  # sd-scripts users keep the module beside them: the current folder is searched
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    write_image(tmp_path / "img" / "2_frog" / "a.png", (64, 64))
    flags = DatasetFlags(train_data_dir=str(tmp_path / "img"), dataset_class="my_datasets.Tagged", resolution="64")
    train = build_train_dataset(flags, {"dreambooth"}, seed=3)
    assert type(train).__name__ == "Tagged"
    assert type(train.with_changes(plan=make_run_plan(4, 1, 1, 5, None))).__name__ == "Tagged"
    batch = train.load_batch(train.batch_plan(1)[0])
    assert batch["source"] == "tagged" and batch["captions"] == ["frog"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Tagged", "expected package.module.ClassName naming a subclass of library.dataset.loader.TrainDataset"),
        ("no_such_module_x.Tagged", "cannot import no_such_module_x (ModuleNotFoundError: No module named"),
        ("json.Nope", "module json has no Nope"),
        ("json.JSONDecoder", "JSONDecoder is not a subclass of library.dataset.loader.TrainDataset"),
    ],
)
def test_dataset_class_errors(tmp_path, spec, message):
    flags = DatasetFlags(train_data_dir=str(tmp_path), dataset_class=spec)
    with pytest.raises(UserError) as info:
        build_train_dataset(flags, {"dreambooth"}, seed=0)
    assert str(info.value).startswith(f"--dataset_class {spec}: {message}")
    assert "\n" not in str(info.value)


def test_resolution_off_the_8_grid_trains_as_sd_scripts(tmp_path):
    # sd-scripts accepts resolution = "52,40" with buckets off; the VAE rounds the latent size down (52/8 -> 6).
    path = write_image(tmp_path / "a.png", (104, 90))
    subset = SubsetConfig("datasets[0].subsets[0]", tmp_path)
    dataset = DatasetConfig("datasets[0]", "dreambooth", (subset,), resolution=(52, 40))
    train = TrainDataset([dataset], [[ImageRecord(path, (104, 90), ("frog",), 0)]], seed=1)
    assert train.load_batch(train.batch_plan(1)[0])["images"].shape == (1, 3, 40, 52)
    cached = attach_latent_cache(train, make_tiny_model(seed=0).vae, to_disk=False, progress=False)
    assert cached.load_batch(cached.batch_plan(1)[0])["latents"].shape == (1, 4, 5, 6)


def test_fingerprint_ignores_settings_left_at_their_defaults():
    """A state saved before a setting existed resumes after it is added: fields at their default are not part of
    the fingerprint, fields set are."""
    from library.dataset.loader import _set_fields

    def version(with_new_setting: bool):
        @dataclasses.dataclass(frozen=True)
        class Subset:
            image_dir: str
            num_repeats: float = 1.0

        if not with_new_setting:
            return Subset

        @dataclasses.dataclass(frozen=True)
        class Subset(Subset):  # noqa: F811 - the same class one version later
            rotate_aug_max_angle: float = 0.0

        return Subset

    old, new = version(False), version(True)
    assert (
        _set_fields([old("a", 2.0)])
        == _set_fields([new("a", 2.0)])
        == (("Subset", (("image_dir", "a"), ("num_repeats", 2.0))),)
    )
    assert _set_fields(new("a", 2.0, rotate_aug_max_angle=5.0)) != _set_fields(new("a", 2.0))
