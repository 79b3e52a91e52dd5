"""OneTrainer's balancing: ``balancing_strategy = "repeats"`` (an alias of num_repeats) and "samples" (exactly N
samples of a subset per epoch: full passes plus a remainder drawn without replacement, reproducible per epoch)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from library.config.dataset_config import DatasetFlags, load_dataset_configs
from library.dataset.epoch import describe_balancing, epoch_samples, sample_counts, samples_per_epoch
from library.dataset.loader import TrainDataset
from library.dataset.scan import scan_dataset
from library.dataset.types import DatasetConfig, SubsetConfig
from library.errors import UserError
from tests.test_epoch import counts_by_name, folder_with


def by_folder(samples) -> dict[str, int]:
    return dict(Counter(r.path.parent.name for r in samples))


def test_sample_counts_are_full_passes_plus_a_remainder_without_replacement():
    counts = sample_counts(4, 10, random.Random(0))
    assert sum(counts) == 10 and sorted(counts) == [2, 2, 3, 3]
    assert sorted(sample_counts(5, 3, random.Random(1))) == [0, 0, 1, 1, 1]
    assert sample_counts(0, 7, random.Random(0)) == [] and sample_counts(3, 6, random.Random(0)) == [2, 2, 2]


def test_samples_strategy_gives_exactly_n_per_epoch_and_varies_the_remainder(tmp_path):
    dataset = DatasetConfig(
        "datasets[0]",
        "dreambooth",
        (
            SubsetConfig("a", folder_with(tmp_path, "a", 3), num_repeats=2),
            SubsetConfig("b", folder_with(tmp_path, "b", 5), samples_per_epoch=7),
            SubsetConfig("c", folder_with(tmp_path, "c", 4), samples_per_epoch=2),
        ),
    )
    records = scan_dataset(dataset).records
    remainders = set()
    for epoch in range(1, 9):
        samples = epoch_samples(dataset, records, epoch, seed=11)
        assert by_folder(samples) == {"a": 6, "b": 7, "c": 2}
        counts = counts_by_name(samples)
        assert sorted(counts[f"b/{i:05d}.png"] for i in range(5)) == [1, 1, 1, 2, 2]
        assert all(counts.get(f"c/{i:05d}.png", 0) <= 1 for i in range(4))  # no repeats while fewer than images
        remainders.add(tuple(sorted(k for k, v in counts.items() if k.startswith("b/") and v == 2)))
        assert epoch_samples(dataset, records, epoch, seed=11) == samples  # same seed and epoch: same list
    assert len(remainders) > 1  # a different remainder in different epochs


def test_reg_subset_with_samples_keeps_n_and_other_reg_is_balanced_to_train(tmp_path):
    dataset = DatasetConfig(
        "datasets[0]",
        "dreambooth",
        (
            SubsetConfig("t", folder_with(tmp_path, "t", 3), num_repeats=2),
            SubsetConfig("r", folder_with(tmp_path, "r", 2), is_reg=True),
            SubsetConfig("q", folder_with(tmp_path, "q", 2), is_reg=True, samples_per_epoch=5),
        ),
    )
    samples = epoch_samples(dataset, scan_dataset(dataset).records, 1, seed=0)
    assert by_folder(samples) == {"t": 6, "r": 6, "q": 5}


def test_batch_plans_resume_identically_with_samples_balancing(tmp_path):
    """Counts per epoch in the batch plan, and a fresh dataset (a resumed run) plans the same batches."""
    dataset = DatasetConfig(
        "datasets[0]",
        "dreambooth",
        (
            SubsetConfig("a", folder_with(tmp_path, "a", 3)),
            SubsetConfig("b", folder_with(tmp_path, "b", 4), samples_per_epoch=9),
        ),
        batch_size=2,
        resolution=(8, 8),
    )
    records = scan_dataset(dataset).records
    first, resumed = (TrainDataset([dataset], [records], seed=21) for _ in range(2))
    for epoch in (1, 2, 3):
        plan = first.batch_plan(epoch)
        folders = Counter(records[i].path.parent.name for p in plan for i in p.items)
        assert folders == {"a": 3, "b": 9} and len(plan) == 6
        assert resumed.batch_plan(epoch)[2:] == plan[2:]
    assert first.batch_plan(1) != first.batch_plan(2)


def write_toml(tmp_path: Path, subset: str, general: str = "") -> Path:
    folder_with(tmp_path, "imgs", 4)
    path = tmp_path / "data.toml"
    path.write_text(
        f"[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n{subset}\n"
    )
    return path


def subset_of(tmp_path: Path, subset: str, general: str = "") -> SubsetConfig:
    flags = DatasetFlags(dataset_config=str(write_toml(tmp_path, subset, general)), dataset_repeats=3)
    return load_dataset_configs(flags, {"dreambooth"})[0].subsets[0]


def test_toml_keys_map_to_repeats_or_samples(tmp_path):
    samples = subset_of(tmp_path, 'balancing = 12\nbalancing_strategy = "SAMPLES"')
    assert (samples.samples_per_epoch, samples.num_repeats) == (12, 1)
    assert samples_per_epoch(samples, 4) == 12
    assert describe_balancing(samples, 4) == "4 images -> 12 samples/epoch (balancing_strategy samples)"
    repeats = subset_of(tmp_path, "balancing = 0.5")
    assert (repeats.samples_per_epoch, repeats.num_repeats) == (None, 0.5)
    assert describe_balancing(repeats, 4) == "4 images x 0.5 repeats = 2 samples/epoch"
    assert subset_of(tmp_path, "balancing = 2\nnum_repeats = 2").num_repeats == 2
    assert subset_of(tmp_path, "", general='balancing = 5\nbalancing_strategy = "samples"').samples_per_epoch == 5
    assert subset_of(tmp_path, "").num_repeats == 3  # --dataset_repeats, as before


@pytest.mark.parametrize(
    "subset, message",
    [
        ("balancing = 2\nnum_repeats = 3", "balancing 2 and num_repeats 3 disagree"),
        ('balancing_strategy = "samples"', 'balancing_strategy = "samples" needs balancing = N'),
        ('balancing = 2.5\nbalancing_strategy = "samples"', "balancing must be a whole number of samples"),
        ('balancing = 4\nbalancing_strategy = "samples"\nnum_repeats = 2', "num_repeats has no effect"),
        ('balancing_strategy = "weights"', 'key \'balancing_strategy\' must be "repeats" or "samples"'),
        ("balancing = 0", "key 'balancing' must be a number above 0"),
        ("balancing = 2000000", "balancing (repeats) must be a number above 0 and at most 1000000"),
    ],
)
def test_bad_balancing_is_a_one_line_error_naming_the_subset(tmp_path, subset, message):
    with pytest.raises(UserError) as info:
        subset_of(tmp_path, subset)
    assert "datasets[0].subsets[0]" in str(info.value) and message in str(info.value)
