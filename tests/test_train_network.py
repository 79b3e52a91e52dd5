"""train_network.py end to end on the real tiny model loaded from disk, with real image files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_network
from library.cli import run_cli
from library.io import load_safetensors
from tests.conftest import REPO
from tests.training import network_args, write_frog_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_trains_a_lora_with_sd_scripts_files_and_metadata(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    train_network.main(network_args(model_dir, data_dir, out, "--max_train_epochs", "2", "--save_every_n_epochs", "1"))
    assert sorted(p.name for p in out.iterdir()) == ["lora-000001.safetensors", "lora.safetensors", "lora_report.txt"]
    tensors, metadata = load_safetensors(out / "lora.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {4}
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert (metadata["ss_steps"], metadata["ss_epoch"], metadata["ss_max_train_steps"]) == ("8", "2", "8")
    assert metadata["ss_num_batches_per_epoch"] == "4" and metadata["ss_seed"] == "3"
    assert metadata["sshs_model_hash"] and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    first = lora_tensors(out / "lora-000001.safetensors")
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    assert not torch.equal(first[up], tensors[up])


def test_config_file_and_output_config_drive_the_script(model_dir, data_dir, tmp_path):
    config = tmp_path / "run.toml"
    argv = network_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "1")
    train_network.main([*argv, "--config_file", str(config), "--output_config"])
    assert not (tmp_path / "out").exists()
    text = config.read_text()
    assert "max_train_steps = 1\n" in text and "network_dim = 4\n" in text
    train_network.main(["--config_file", str(config), "--network_dim", "2"])
    tensors = lora_tensors(tmp_path / "out" / "lora.safetensors")
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--network_module", "networks.nope"], "error: --network_module networks.nope: cannot import it"),
        (["--save_last_n_steps", "2"], "error: --save_last_n_steps needs --save_every_n_steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, data_dir, tmp_path, capsys, extra, message):
    code = run_cli(train_network.main, network_args(model_dir, data_dir, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(message)


def test_two_processes_agree_and_match_one_process_with_the_same_global_batch(model_dir, data_dir, tmp_path):
    """Two processes on CPU (accelerate launch starts them with ``--multi_gpu``; ``--cpu`` runs one process only):
    each takes every other batch and gradients are averaged, so one process with --gradient_accumulation_steps 2
    sees the same batches and noise per optimizer step.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out2 = tmp_path / "two"
    argv = network_args(model_dir, data_dir, out2, "--max_train_steps", "2")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    launch += ["29517", str(REPO / "train_network.py"), *argv]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 processes hold identical trained weights" in done.stderr
    state_args = ["--max_train_steps", "2", "--gradient_accumulation_steps", "2"]
    train_network.main(network_args(model_dir, data_dir, tmp_path / "one", *state_args))
    two = lora_tensors(out2 / "lora.safetensors")
    one = lora_tensors(tmp_path / "one" / "lora.safetensors")
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-5)
