"""tools/cache_latents.py: it writes the latent files a training run with --cache_latents_to_disk uses, so that run
encodes nothing (its own log line and the files' bytes and times say so); a re-run resumes; bad input is one line."""

from __future__ import annotations

import logging

import pytest

import train_network
from library.cli import run_cli
from tests.images import write_image
from tests.training import network_args, save_tiny_model, write_dataset_toml, write_frog_dataset
from tools.cache_latents import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cache_latents"))


def test_training_after_the_tool_encodes_nothing(model_dir, tmp_path, caplog):
    folder = write_frog_dataset(tmp_path / "data", count=3) / "1_frog"
    write_image(folder / "wide.png", size=(96, 64), seed=9)
    (folder / "wide.txt").write_text("a wide frog")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    toml = write_dataset_toml(
        tmp_path / "data.toml",
        [{"subsets": [{"image_dir": str(folder), "caption_extension": ".txt"}]}],
        {"resolution": 64},
    )
    tool = ["--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(toml)]
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        assert run_cli(main, tool) == 0
    names = ["img0_0064x0064_sd.npz", "img1_0064x0064_sd.npz", "img2_0064x0064_sd.npz", "wide_0096x0064_sd.npz"]
    assert sorted(p.name for p in folder.glob("*.npz")) == names
    assert any(
        "cache_latents: 4 processed, 0 skipped (already done), 1 failed, 4 written" in m for m in caplog.messages
    )
    files = {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in names}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        assert run_cli(main, tool) == 0  # a re-run finds everything done
    assert any(
        "cache_latents: 0 processed, 4 skipped (already done), 1 failed, 0 written" in m for m in caplog.messages
    )

    caplog.clear()
    out = tmp_path / "out"
    train = network_args(model_dir, None, out, "--dataset_config", str(toml), "--cache_latents_to_disk")
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        assert run_cli(train_network.main, [*train, "--max_train_steps", "1"]) == 0
    assert "latents: 0 encoded, 4 reused from disk, 0 failed" in caplog.messages  # broken.png: dropped at the scan
    assert (out / "lora.safetensors").is_file()
    assert {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in names} == files


def test_bad_input_is_one_line(model_dir, tmp_path, capsys):
    write_frog_dataset(tmp_path / "data", count=1)
    data = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "64"]
    assert run_cli(main, ["--pretrained_model_name_or_path", str(model_dir), *data, "--sdxl"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--sdxl:" in err[0] and "not SDXL; leave out --sdxl" in err[0]
    assert run_cli(main, data) == 2
    assert "--pretrained_model_name_or_path is required" in capsys.readouterr().err
    assert run_cli(main, ["--pretrained_model_name_or_path", str(model_dir), *data, "--color_aug"]) == 2
    assert "color_aug cannot be combined with --cache_latents_to_disk" in capsys.readouterr().err
    assert not list((tmp_path / "data").rglob("*.npz"))
