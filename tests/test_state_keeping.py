"""Which models and state folders a train_network.py run leaves behind with --save_state, --save_last_n_*_state and
--save_state_on_train_end (sd-scripts' rules, worked by hand for 2 batches per epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest

import train_network
from tests.training import network_args, write_frog_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)  # batch size 1: 2 steps per epoch


def outputs(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    train_network.main(network_args(model_dir, data_dir, out, *extra))
    return sorted(p.name for p in out.iterdir())


def test_last_n_epochs_state_keeps_the_newest_states_and_train_end_adds_the_last(model_dir, data_dir, tmp_path):
    """4 epochs, saves every epoch: epoch saves at 1, 2, 3 (the 4th is the final model); keeping 2 states removes
    epoch 1's state when epoch 3's is written; --save_state also writes the last state at the end."""
    names = outputs(
        model_dir,
        data_dir,
        tmp_path / "out",
        *("--max_train_epochs", "4", "--save_every_n_epochs", "1", "--save_state", "--save_last_n_epochs_state", "2"),
    )
    assert names == [
        "lora-000001.safetensors",
        "lora-000002-state",
        "lora-000002.safetensors",
        "lora-000003-state",
        "lora-000003.safetensors",
        "lora-state",
        "lora.safetensors",
        "lora_report.txt",
    ]


def test_last_n_steps_state_counts_steps(model_dir, data_dir, tmp_path):
    """6 steps, saves every 2 (the final step too): keeping 2 steps of states, saving step 6 removes step 2
    (6 - 2 - 1 = 3, rounded down to a save); the models are all kept."""
    names = outputs(
        model_dir,
        data_dir,
        tmp_path / "out",
        *("--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state", "--save_last_n_steps_state", "2"),
    )
    assert names == [
        "lora-state",
        "lora-step00000002.safetensors",
        "lora-step00000004-state",
        "lora-step00000004.safetensors",
        "lora-step00000006-state",
        "lora-step00000006.safetensors",
        "lora.safetensors",
        "lora_report.txt",
    ]


def test_save_state_on_train_end_alone_writes_only_the_last_state(model_dir, data_dir, tmp_path):
    names = outputs(
        model_dir,
        data_dir,
        tmp_path / "out",
        *("--max_train_epochs", "2", "--save_every_n_epochs", "1", "--save_state_on_train_end"),
    )
    assert names == ["lora-000001.safetensors", "lora-state", "lora.safetensors", "lora_report.txt"]
    assert (tmp_path / "out" / "lora-state" / "train_state.json").is_file()  # a resumable state, not an empty folder
