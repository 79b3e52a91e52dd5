"""sdxl_train_network.py end to end on the tiny SDXL model saved as a diffusers folder, with real image files:
sd-scripts' SDXL LoRA names and metadata, step-exact resume, text-encoder output caching, step-32 buckets, sampling
and the refusals of the wrong model family."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl_train_network
import train_network
from library.cli import run_cli
from library.io import load_safetensors
from tests.images import write_image
from tests.training import network_args, write_frog_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = ["--max_train_steps", "4"]
UNET_ONLY = [*STEPS, "--network_train_unet_only"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(sdxl_dir, data_dir, tmp_path_factory) -> Path:
    """Four steps with both text encoders trained and a state saved after step 2."""
    out = tmp_path_factory.mktemp("straight")
    sdxl_train_network.main(
        network_args(
            sdxl_dir, data_dir, out, *STEPS, "--save_every_n_steps", "2", "--save_state", "--lr_scheduler", "cosine"
        )
    )
    return out


@pytest.fixture(scope="module")
def unet_only(sdxl_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unet_only")
    sdxl_train_network.main(network_args(sdxl_dir, data_dir, out, *UNET_ONLY))
    return out / "lora.safetensors"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_lora_has_sd_scripts_sdxl_names_and_metadata(straight):
    weights, metadata = load_safetensors(straight / "lora.safetensors")
    unet_parts = {re.match(r"lora_unet_([a-z]+_blocks?)_\d+_", k).group(1) for k in weights if "_unet_" in k}
    assert unet_parts == {"input_blocks", "middle_block", "output_blocks"}
    assert not any(k.startswith("lora_unet_") and "down_blocks" in k for k in weights)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in weights)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in weights)
    assert not any(k.startswith("lora_te_") for k in weights)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["ss_steps"] == "4" and metadata["ss_network_dim"] == "4"


def test_unet_only_has_no_text_encoder_keys(unet_only):
    names = tensors(unet_only).keys()
    assert names and all(k.startswith("lora_unet_") for k in names)


def test_resume_is_step_exact(straight, sdxl_dir, data_dir, tmp_path):
    state = straight / "lora-step00000002-state"
    assert state.is_dir()
    resumed = tmp_path / "resumed"
    extra = ["--lr_scheduler", "cosine", "--resume", str(state)]
    sdxl_train_network.main(network_args(sdxl_dir, data_dir, resumed, *STEPS, *extra))
    assert_same_tensors(tensors(resumed / "lora.safetensors"), tensors(straight / "lora.safetensors"))


def test_cached_text_encoder_outputs_train_the_same_lora(unet_only, sdxl_dir, data_dir, tmp_path):
    """Captions are cached in batches of the training batch size, so the cache holds exactly what live encoding
    gives (a matmul's rounding depends on its row count) and the LoRA is bit-identical (torch.equal)."""
    memory = tmp_path / "memory"
    sdxl_train_network.main(network_args(sdxl_dir, data_dir, memory, *UNET_ONLY, "--cache_text_encoder_outputs"))
    assert_same_tensors(tensors(memory / "lora.safetensors"), tensors(unet_only))
    disk = tmp_path / "disk"
    sdxl_train_network.main(network_args(sdxl_dir, data_dir, disk, *UNET_ONLY, "--cache_text_encoder_outputs_to_disk"))
    assert_same_tensors(tensors(disk / "lora.safetensors"), tensors(unet_only))
    files = sorted(p.name for p in (data_dir / "1_frog").glob("*_te_outputs.npz"))
    assert files == [f"img{i}_te_outputs.npz" for i in range(4)]
    with np.load(data_dir / "1_frog" / "img0_te_outputs.npz") as z:
        assert {"hidden_state1", "hidden_state2", "pool2"} <= set(z.files)
        assert z["hidden_state1"].shape[-2] == 77 and z["pool2"].ndim == 1


def test_caching_while_training_text_encoders_is_refused(sdxl_dir, data_dir, tmp_path, capsys):
    argv = network_args(sdxl_dir, data_dir, tmp_path / "out", *STEPS, "--cache_text_encoder_outputs")
    assert run_cli(sdxl_train_network.main, argv) == 2
    err = last_error(capsys)
    assert err.startswith("error: --cache_text_encoder_outputs") and "--network_train_unet_only" in err


def test_step_32_buckets_train_with_sdxl_latent_cache_files(sdxl_dir, tmp_path):
    folder = tmp_path / "data" / "1_frog"
    for i, size in enumerate([(96, 48), (48, 96), (64, 64)]):
        write_image(folder / f"img{i}.png", size=size, seed=i)
        (folder / f"img{i}.txt").write_text(f"a frog {i}")
    buckets = ["--enable_bucket", "--bucket_reso_steps", "32", "--min_bucket_reso", "32", "--max_bucket_reso", "128"]
    out = tmp_path / "out"
    argv = network_args(sdxl_dir, tmp_path / "data", out, *UNET_ONLY, *buckets, "--cache_latents_to_disk")
    sdxl_train_network.main(argv)
    assert (out / "lora.safetensors").is_file()
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert len(names) == 3 and all(n.endswith("_sdxl.npz") for n in names)
    with np.load(folder / next(n for n in names if n.startswith("img1_"))) as z:
        assert z["latents"].shape[1:] == (12, 4)  # the 48x96 image in the 32x96 bucket (the VAE downsamples by 8)


def test_samples_use_the_prompt_sizes(sdxl_dir, data_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a frog --w 96 --h 64 --s 2 --d 1\n")
    out = tmp_path / "out"
    extra = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--sample_sampler", "euler"]
    sdxl_train_network.main(network_args(sdxl_dir, data_dir, out, *UNET_ONLY, *extra))
    images = sorted((out / "sample").glob("*.png"))
    assert len(images) == 1
    with Image.open(images[0]) as im:
        assert im.size == (96, 64)


@pytest.mark.parametrize(
    "main, model, expected",
    [
        (sdxl_train_network.main, "tiny-sd1", "SD"),
        (train_network.main, "tiny-sdxl", "SDXL"),
    ],
)
def test_the_other_family_is_refused_naming_its_scripts(main, model, expected, data_dir, tmp_path, capsys):
    assert run_cli(main, network_args(model, data_dir, tmp_path / "out", *STEPS)) == 2
    err = last_error(capsys)
    assert err.startswith(f"error: {model} is an {expected}")
    scripts = "the sdxl_* scripts" if expected == "SDXL" else "the scripts without the sdxl_ prefix"
    assert scripts in err
    assert not (tmp_path / "out").exists()


def test_v2_is_refused(sdxl_dir, data_dir, tmp_path, capsys):
    assert run_cli(sdxl_train_network.main, network_args(sdxl_dir, data_dir, tmp_path / "out", "--v2")) == 2
    assert last_error(capsys).startswith("error: --v2 names an SD 2.x model")
