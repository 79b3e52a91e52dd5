"""train_network.py against sd-scripts' behaviour: dataset metadata, trackers, LyCORIS and the network flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import library.engine.launch as launch
import train_network
from library.cli import run_cli
from library.io import load_safetensors
from tests.images import write_image
from tests.training import network_args, write_captioned_images, write_dataset_toml


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``2_frog``: three captioned images (64x64, 128x64, 100x64); ``1_cat``: one image without a caption."""
    root = tmp_path_factory.mktemp("data")
    captions = ["Frog, green, pond", "frog,  ,sky", "A Frog, Green,"]
    write_captioned_images(root / "2_frog", captions, sizes=[(64, 64), (128, 64), (100, 64)])
    write_image(root / "1_cat" / "cat.png", size=(64, 64), seed=9)
    return root


def base_args(model_dir: Path, data: Path | None, out: Path, *extra: str) -> list[str]:
    return network_args(model_dir, data, out, *extra, name="net")


BUCKETS = ["--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
EXPECTED_TAGS = {"2_frog": {"frog": 2, "green": 2, "pond": 1, "sky": 1, "a frog": 1}, "1_cat": {"cat": 1}}
# no upscale, area budget 128x128: 64x64 -> (64, 64); 128x64 -> (128, 64); 100x64 is cropped to (64, 64), so its
# aspect error is 64/64 - 100/64 = -0.5625; the mean over the 4 images is 0.140625. Samples count the repeats:
# (64, 64) holds img0 and img2 twice and the cat once.
EXPECTED_BUCKETS = {
    "buckets": {"0": {"resolution": [64, 64], "count": 5}, "1": {"resolution": [128, 64], "count": 2}},
    "mean_img_ar_error": 0.140625,
}


def test_flag_dataset_writes_tag_frequency_and_bucket_info(model_dir, data_dir, tmp_path):
    argv = base_args(model_dir, data_dir, tmp_path, "--resolution", "128", *BUCKETS)
    train_network.main([*argv, "--max_train_steps", "1", "--network_train_unet_only"])
    metadata = load_safetensors(tmp_path / "net.safetensors")[1]
    assert json.loads(metadata["ss_tag_frequency"]) == EXPECTED_TAGS
    assert json.loads(metadata["ss_bucket_info"]) == EXPECTED_BUCKETS
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "2_frog": {"n_repeats": 2, "img_count": 3},
        "1_cat": {"n_repeats": 1, "img_count": 1},
    }


def test_toml_dataset_writes_per_dataset_tag_frequency_and_bucket_info(model_dir, data_dir, tmp_path):
    bucketed = {"enable_bucket": True, "bucket_no_upscale": True, "min_bucket_reso": 64, "max_bucket_reso": 128}
    frog = {"image_dir": str(data_dir / "2_frog"), "num_repeats": 2}
    cat = {"image_dir": str(data_dir / "1_cat"), "class_tokens": "cat"}
    kitten = {"image_dir": str(data_dir / "1_cat"), "class_tokens": "kitten, cat"}
    datasets = [{"resolution": 128, **bucketed, "subsets": [frog, cat]}, {"resolution": 64, "subsets": [kitten]}]
    config = write_dataset_toml(tmp_path / "dataset.toml", datasets, general={"caption_extension": ".txt"})
    argv = base_args(model_dir, None, tmp_path, "--dataset_config", str(config), "--max_train_steps", "1")
    train_network.main([*argv, "--network_train_unet_only"])
    metadata = load_safetensors(tmp_path / "net.safetensors")[1]
    first, second = json.loads(metadata["ss_datasets"])
    assert first["tag_frequency"] == EXPECTED_TAGS and first["bucket_info"] == EXPECTED_BUCKETS
    assert second["tag_frequency"] == {"1_cat": {"kitten": 1, "cat": 1}} and second["bucket_info"] is None
    # a folder used by two datasets is counted once (the first), as sd-scripts merges them
    assert json.loads(metadata["ss_tag_frequency"]) == EXPECTED_TAGS
    assert "ss_bucket_info" not in metadata


def wandb_history(wandb_dir: Path) -> list[dict[str, float]]:
    """The logged rows of the one offline run under ``wandb_dir``, read from its ``.wandb`` file.

    That file is a LevelDB-style log (7-byte file header, 32 KiB blocks, chunks with a 7-byte crc/length/type
    header: 1 full, 2 first, 3 middle, 4 last) of ``wandb.proto`` Record messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    data = runs[0].read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.parametrize("log_with", ["wandb", "all"])
def test_wandb_offline_run_records_the_scalars(model_dir, data_dir, tmp_path, monkeypatch, log_with):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb keeps the first run's settings (WANDB_DIR) for the whole process otherwise
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging_dir = tmp_path / "logs"
    argv = base_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "2", "--log_with", log_with)
    train_network.main([*argv, "--logging_dir", str(logging_dir), "--network_train_unet_only"])
    rows = wandb_history(tmp_path)
    assert [row["_step"] for row in rows] == [1, 2]
    assert [row["lr/unet"] for row in rows] == [0.01, 0.01]
    first, second = (row["loss/current"] for row in rows)
    assert rows[0]["loss/average"] == pytest.approx(first)
    assert rows[1]["loss/average"] == pytest.approx((first + second) / 2)
    assert bool(list(logging_dir.glob("**/events.out.tfevents.*"))) == (log_with == "all")


def test_lycoris_loha_trains_and_saves_hada_keys(model_dir, data_dir, tmp_path):
    pytest.importorskip("lycoris")
    argv = base_args(model_dir, data_dir, tmp_path, "--max_train_steps", "2", "--network_module", "lycoris.kohya")
    train_network.main([*argv, "--network_args", "algo=loha", "preset=attn-mlp"])
    tensors, metadata = load_safetensors(tmp_path / "net.safetensors")
    hada = {k.rsplit(".", 1)[-1] for k in tensors if ".hada_" in k}
    assert hada == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert not any("lora_down" in k for k in tensors)
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha", "preset": "attn-mlp"}


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: up @ down * alpha / dim}`` for every LoRA module in a file (computed here, independently)."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].float().flatten(1), tensors[f"{name}.lora_up.weight"].float().flatten(1)
            out[name] = up @ down * (tensors[f"{name}.alpha"].float() / down.shape[0])
    return out


@pytest.fixture(scope="module")
def trained(model_dir, data_dir, tmp_path_factory) -> Path:
    """A rank-4 LoRA trained for 2 steps on both the UNet and the text encoder."""
    out = tmp_path_factory.mktemp("trained")
    train_network.main(base_args(model_dir, data_dir, out, "--max_train_steps", "2"))
    return out / "net.safetensors"


def test_network_weights_and_dim_from_weights_continue_from_a_file(model_dir, data_dir, trained, tmp_path):
    start = load_safetensors(trained)[0]
    tiny_lr = ["--max_train_steps", "1", "--learning_rate", "1e-9", "--network_weights", str(trained)]
    train_network.main(base_args(model_dir, data_dir, tmp_path / "a", *tiny_lr))
    train_network.main(
        base_args(model_dir, data_dir, tmp_path / "b", *tiny_lr, "--dim_from_weights", "--network_dim", "8")
    )
    for run in ("a", "b"):
        tensors = load_safetensors(tmp_path / run / "net.safetensors")[0]
        assert tensors.keys() == start.keys()
        for key in start:
            assert tensors[key].shape == start[key].shape, key
            torch.testing.assert_close(tensors[key], start[key], rtol=0, atol=1e-6)
    fresh = load_safetensors(trained.parent / "net.safetensors")[0]
    up = next(k for k in fresh if k.endswith("lora_up.weight"))
    assert fresh[up].abs().max() > 1e-4  # the started-from file is trained, so the check above is not vacuous


def lora_targets(components) -> dict[str, torch.nn.Module]:
    """Every UNet and text-encoder module under its kohya LoRA name (text encoder in the transformers 4 spelling)."""
    targets = {"lora_unet_" + path.replace(".", "_"): m for path, m in components.unet.named_modules() if path}
    for path, module in components.text_encoder.named_modules():
        if path:
            targets["lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")] = module
    return targets


def test_base_weights_are_merged_with_their_multiplier(model_dir, data_dir, trained, tmp_path, monkeypatch):
    """With multiplier 0.5 the base model trained on holds W + 0.5 * (alpha / dim) * up @ down for every module of
    the merged file (computed here from the file), and every other weight is untouched; with 0 the LoRA trained on
    top is the one trained without --base_weights."""
    loaded = []
    real = launch.load_base_model
    monkeypatch.setattr(launch, "load_base_model", lambda source: loaded.append(real(source)) or loaded[-1])
    common = ["--max_train_steps", "1", "--network_train_unet_only"]
    train_network.main(base_args(model_dir, data_dir, tmp_path / "plain", *common))
    for name, multiplier in (("zero", "0"), ("half", "0.5")):
        extra = ["--base_weights", str(trained), "--base_weights_multiplier", multiplier]
        train_network.main(base_args(model_dir, data_dir, tmp_path / name, *common, *extra))
    plain, zero = (load_safetensors(tmp_path / n / "net.safetensors")[0] for n in ("plain", "zero"))
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=0, atol=1e-7)

    base, merged = lora_targets(loaded[0]), lora_targets(loaded[2])
    deltas = lora_pairs(load_safetensors(trained)[0])
    assert any(n.startswith("lora_te_") for n in deltas) and any(n.startswith("lora_unet_") for n in deltas)
    assert max(float(d.abs().max()) for d in deltas.values()) > 1e-3  # 0.5 and 1.0 differ far beyond atol
    for name, module in merged.items():
        weight, original = getattr(module, "weight", None), getattr(base[name], "weight", None)
        if not isinstance(weight, torch.Tensor) or name.endswith(("_lora_down", "_lora_up")):
            continue
        if name in deltas:
            expected = original + 0.5 * deltas[name].reshape(original.shape)
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(weight, original), name
    assert set(deltas) <= set(merged)


def test_scale_weight_norms_caps_every_module(model_dir, data_dir, tmp_path):
    argv = base_args(model_dir, data_dir, tmp_path, "--max_train_steps", "2", "--learning_rate", "0.1")
    train_network.main([*argv, "--scale_weight_norms", "0.05"])
    norms = {name: float(w.norm()) for name, w in lora_pairs(load_safetensors(tmp_path / "net.safetensors")[0]).items()}
    assert max(norms.values()) <= 0.05 * (1 + 1e-4)
    assert max(norms.values()) >= 0.05 * (1 - 1e-4)  # lr 0.1 pushes at least one module past the cap


@pytest.mark.parametrize(
    "flag, present, absent",
    [
        ("--network_train_unet_only", "lora_unet_", "lora_te_"),
        ("--network_train_text_encoder_only", "lora_te_", "lora_unet_"),
    ],
)
def test_train_only_one_model(model_dir, data_dir, tmp_path, flag, present, absent):
    train_network.main(base_args(model_dir, data_dir, tmp_path, "--max_train_steps", "1", flag))
    keys = load_safetensors(tmp_path / "net.safetensors")[0].keys()
    assert any(k.startswith(present) for k in keys) and not any(k.startswith(absent) for k in keys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--network_weights", "missing.safetensors"], "error: --network_weights missing.safetensors: no such file"),
        (["--base_weights", "missing.safetensors"], "error: --base_weights missing.safetensors: no such file"),
        (["--dim_from_weights"], "error: --dim_from_weights needs --network_weights"),
    ],
)
def test_bad_network_flags_are_one_line_errors(model_dir, data_dir, tmp_path, capsys, extra, message):
    code = run_cli(train_network.main, base_args(model_dir, data_dir, tmp_path, "--max_train_steps", "1", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(message)
    assert not (tmp_path / "net.safetensors").exists()


def test_accepted_but_unused_settings_are_named_not_ignored(caplog):
    import logging

    from library.engine.launch import _warn_unused_settings

    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        _warn_unused_settings(["--some_flag is accepted but unused"], lowram=True)
    assert "--lowram has no effect here" in caplog.text
    assert "--some_flag is accepted but unused" in caplog.text
    assert "validation_split" not in caplog.text  # implemented now (library/dataset/validation.py)
