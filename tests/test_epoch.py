"""Epoch composition: integer and fractional repeats, per-epoch variation, and sd-scripts' reg balancing counts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from library.dataset.epoch import balance_reg_counts, epoch_samples
from library.dataset.scan import scan_dataset
from library.dataset.types import DatasetConfig, SubsetConfig
from tests.images import write_image


def folder_with(tmp_path: Path, name: str, count: int) -> Path:
    folder = tmp_path / name
    data = write_image(folder / "00000.png", (8, 8)).read_bytes()
    for i in range(1, count):
        (folder / f"{i:05d}.png").write_bytes(data)
    return folder


def dataset_of(*subsets: SubsetConfig) -> DatasetConfig:
    return DatasetConfig(name="datasets[0]", style="dreambooth", subsets=subsets)


def counts_by_name(samples) -> dict[str, int]:
    return dict(Counter(f"{r.path.parent.name}/{r.path.name}" for r in samples))


def test_integer_repeats(tmp_path):
    dataset = dataset_of(
        SubsetConfig(name="a", image_dir=folder_with(tmp_path, "a", 3), num_repeats=10),
        SubsetConfig(name="b", image_dir=folder_with(tmp_path, "b", 2), num_repeats=1),
    )
    records = scan_dataset(dataset).records
    samples = epoch_samples(dataset, records, epoch=1, seed=0)
    assert counts_by_name(samples) == {"a/00000.png": 10, "a/00001.png": 10, "a/00002.png": 10, "b/00000.png": 1,
                                       "b/00001.png": 1}  # fmt: skip
    assert epoch_samples(dataset, records, epoch=2, seed=0) == samples


def test_fractional_repeats_count_and_variation(tmp_path):
    dataset = dataset_of(SubsetConfig(name="big", image_dir=folder_with(tmp_path, "big", 1000), num_repeats=0.0072))
    records = scan_dataset(dataset).records
    per_epoch = [epoch_samples(dataset, records, epoch=e, seed=42) for e in range(1, 6)]
    assert [len(s) for s in per_epoch] == [7] * 5  # floor(1000 * 0.0072) = 7
    assert all(len(set(s)) == 7 for s in per_epoch)  # 7 different images
    assert len({frozenset(s) for s in per_epoch}) == 5  # a different choice every epoch
    assert epoch_samples(dataset, records, epoch=3, seed=42) == per_epoch[2]
    assert epoch_samples(dataset, records, epoch=3, seed=43) != per_epoch[2]


def test_fractional_repeats_above_one(tmp_path):
    dataset = dataset_of(SubsetConfig(name="f", image_dir=folder_with(tmp_path, "f", 4), num_repeats=2.5))
    records = scan_dataset(dataset).records
    for epoch in range(1, 4):
        counts = counts_by_name(epoch_samples(dataset, records, epoch=epoch, seed=0))
        assert sum(counts.values()) == 10  # floor(4 * 2.5)
        assert sorted(counts.values()) == [2, 2, 3, 3]


def test_floor_avoids_float_error(tmp_path):
    dataset = dataset_of(SubsetConfig(name="f", image_dir=folder_with(tmp_path, "f", 100), num_repeats=0.29))
    records = scan_dataset(dataset).records
    assert len(epoch_samples(dataset, records, epoch=1, seed=0)) == 29  # 100 * 0.29 == 28.999999999999996 in floats


def test_reg_repeated_to_match_train(tmp_path):
    # train: 2 images x 10 = 20 samples; reg: 3 images x 1 -> first pass 3, then 17 more one at a time: 7, 7, 6
    dataset = dataset_of(
        SubsetConfig(name="t", image_dir=folder_with(tmp_path, "t", 2), num_repeats=10),
        SubsetConfig(name="r", image_dir=folder_with(tmp_path, "r", 3), is_reg=True),
    )
    samples = epoch_samples(dataset, scan_dataset(dataset).records, epoch=1, seed=0)
    assert counts_by_name(samples) == {"t/00000.png": 10, "t/00001.png": 10, "r/00000.png": 7, "r/00001.png": 7,
                                       "r/00002.png": 6}  # fmt: skip


def test_reg_truncated_to_train(tmp_path):
    # train: 1 image x 2 = 2 samples; reg: 5 images x 1 -> only the first two are used
    dataset = dataset_of(
        SubsetConfig(name="t", image_dir=folder_with(tmp_path, "t", 1), num_repeats=2),
        SubsetConfig(name="r", image_dir=folder_with(tmp_path, "r", 5), is_reg=True),
    )
    samples = epoch_samples(dataset, scan_dataset(dataset).records, epoch=1, seed=0)
    assert counts_by_name(samples) == {"t/00000.png": 2, "r/00000.png": 1, "r/00001.png": 1}


def test_reg_first_pass_overshoots_like_sd_scripts(tmp_path):
    # train: 1 x 3 = 3; reg: 2 images x 2 repeats -> 2 (n=2 < 3), then 2 more (n=4 >= 3): 4 reg samples
    dataset = dataset_of(
        SubsetConfig(name="t", image_dir=folder_with(tmp_path, "t", 1), num_repeats=3),
        SubsetConfig(name="r", image_dir=folder_with(tmp_path, "r", 2), num_repeats=2, is_reg=True),
    )
    samples = epoch_samples(dataset, scan_dataset(dataset).records, epoch=1, seed=0)
    assert counts_by_name(samples) == {"t/00000.png": 3, "r/00000.png": 2, "r/00001.png": 2}


def test_reg_without_train_samples_is_unused(tmp_path):
    dataset = dataset_of(
        SubsetConfig(name="t", image_dir=folder_with(tmp_path, "t", 1), num_repeats=0.5),
        SubsetConfig(name="r", image_dir=folder_with(tmp_path, "r", 2), is_reg=True),
    )
    assert epoch_samples(dataset, scan_dataset(dataset).records, epoch=1, seed=0) == []


def test_balance_reg_counts_matches_the_reference_loop():
    def reference(reg: list[int], num_train: int) -> list[int]:
        final, n, first = [0] * len(reg), 0, True
        while n < num_train:
            for i, count in enumerate(reg):
                if first:
                    final[i] = count
                    n += count
                else:
                    final[i] += 1
                    n += 1
                if n >= num_train:
                    break
            first = False
        return final

    for reg in ([1], [1, 1, 1], [3, 1, 2], [5, 5], [2, 0, 4]):
        for num_train in range(0, 25):
            assert balance_reg_counts(reg, num_train) == reference(reg, num_train), (reg, num_train)


def test_folders_to_epoch_end_to_end(tmp_path):
    import argparse

    from library.config.dataset_config import dataset_flags, load_dataset_configs
    from library.config.flags import add_dataset_arguments

    train, reg = tmp_path / "train", tmp_path / "reg"
    folder_with(train, "4_sks dog", 3)
    folder_with(reg, "1_dog", 5)
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--train_data_dir", str(train), "--reg_data_dir", str(reg)])
    (dataset,) = load_dataset_configs(dataset_flags(args), {"dreambooth"})
    samples = epoch_samples(dataset, scan_dataset(dataset).records, epoch=1, seed=0)
    # 3 x 4 = 12 train samples; reg: 5 images x 1, then 7 more one image at a time in turn: 3, 3, 2, 2, 2
    assert counts_by_name(samples) == {"4_sks dog/00000.png": 4, "4_sks dog/00001.png": 4, "4_sks dog/00002.png": 4,
                                       "1_dog/00000.png": 3, "1_dog/00001.png": 3, "1_dog/00002.png": 2,
                                       "1_dog/00003.png": 2, "1_dog/00004.png": 2}  # fmt: skip
