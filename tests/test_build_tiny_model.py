"""tools/build_tiny_model.py at toy scale: every stage runs for real (data, VAE loop, fine_tune.py from scratch as
a subprocess, packaging, evaluation), proving the pipeline, not the model's quality."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTokenizer

from library.cli import run_cli
from library.models.load import load_model
from library.shapes.scenes import held_out_combinations
from library.shapes.vae_training import VaeTrainSettings, load_images, train_vae
from library.text.tokenizer import load_packaged_tokenizer
from tools.build_tiny_model import main

TOY = [
    "--images", "12",
    "--vae_channels", "8,8,8,8",
    "--vae_steps", "2",
    "--vae_batch_size", "2",
    "--vae_decoder_steps", "2",
    "--unet_channels", "8,16,16,16",
    "--text_width", "16",
    "--text_layers", "1",
    "--train_batch_size", "4",
    "--max_train_steps", "3",
    "--lr_warmup_steps", "1",
    "--bucket_steps", "2",
    "--bucket_warmup_steps", "1",
    "--eval_seeds", "1",
    "--eval_steps", "2",
    "--train_eval_count", "2",
    "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Path, dict, int]]:
    root = Path(tempfile.mkdtemp(prefix="sdt-shapes-"))
    output = root / "model"
    folders = ["--output_dir", str(output), "--work_dir", str(root / "work"), "--grid_dir", str(root / "grids")]
    code = run_cli(main, [*folders, *TOY])
    record = json.loads((output / "build.json").read_text(encoding="utf-8"))
    yield output, record, code
    shutil.rmtree(root, ignore_errors=True)


def test_build_writes_a_loadable_model_with_its_record(built):
    output, record, code = built
    assert code == 0
    components = load_model(output)
    assert list(components.unet.config.block_out_channels) == [8, 16, 16, 16]
    assert components.unet.config.cross_attention_dim == 16
    assert list(components.vae.config.block_out_channels) == [8, 8, 8, 8]
    assert components.vae.config.scaling_factor == record["vae_training"]["scaling_factor"]
    assert components.text_encoders[0].config.vocab_size == 49408
    with safe_open(str(output / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    files = {str(p.relative_to(output)): p.stat().st_size for p in output.rglob("*") if p.is_file()}
    files.pop("build.json")
    assert record["model"]["file_bytes"] == files
    assert record["model"]["total_bytes"] == sum(files.values())


def test_build_record_names_data_command_timings_and_grids(built):
    output, record, _ = built
    assert record["data"]["images"] == 12
    assert [tuple(c) for c in record["data"]["held_out"]] == list(held_out_combinations())
    command = record["fine_tune_command"]
    assert command.startswith("python ")
    for flag in ("--from_scratch_config", "--vae", "--train_text_encoder", "--cache_latents", "--max_train_steps 3"):
        assert flag in command
    stages = {"dataset", "vae", "vae_decoder", "fine_tune", "bucket_stage", "package", "evaluate", "total"}
    assert set(record["runtime_s"]) == stages
    assert record["runtime_s"]["total"] == pytest.approx(sum(v for k, v in record["runtime_s"].items() if k != "total"))
    assert record["reused_stages"] == []
    quality = record["quality"]["sizes"]
    assert set(quality) == {"64x64", "96x64", "64x96"}
    grids = sorted(p.name for p in (output.parent / "grids").iterdir())
    assert grids == ["held_out_64x64.png", "held_out_64x96.png", "held_out_96x64.png"]
    assert quality["64x64"]["count"] == len(held_out_combinations())
    assert set(quality["64x64"]["held_out"]) == {"colour", "shape", "background", "all"}


def test_second_stage_continues_stage_one_on_buckets_without_upscaling(built):
    output, record, _ = built
    work = output.parent / "work"
    command = record["bucket_stage_command"]
    assert f"--pretrained_model_name_or_path {work / 'ft' / 'tiny-shapes'} " in command
    assert "--from_scratch_config" not in command
    for flag in ("--max_train_steps 2", "--learning_rate 0.0003", "--learning_rate_te 0.00015", "--lr_warmup_steps 1"):
        assert flag in command
    assert f"--dataset_config {work / 'dataset-buckets.toml'} " in command
    toml = (work / "dataset-buckets.toml").read_text(encoding="utf-8")
    assert "resolution = 96\n" in toml and "bucket_no_upscale = true\n" in toml
    assert "bucket_no_upscale" not in (work / "dataset.toml").read_text(encoding="utf-8")
    assert record["trained_model"] == "ft-buckets/tiny-shapes"


def unet_weights(model: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_reuse_work_dir_keeps_finished_stages_and_reruns_changed_ones(built):
    output, record, _ = built
    work, again = output.parent / "work", output.parent / "again"
    reuse = ["--output_dir", str(again), "--work_dir", str(work), "--reuse_work_dir", *TOY]
    assert run_cli(main, reuse) == 0
    second = json.loads((again / "build.json").read_text(encoding="utf-8"))
    assert second["reused_stages"] == ["vae", "fine_tune", "bucket_stage"]
    for stage in ("vae", "vae_decoder", "fine_tune", "bucket_stage"):
        assert second["runtime_s"][stage] == record["runtime_s"][stage]
    assert second["vae_training"] == record["vae_training"]
    first_weights, second_weights = unet_weights(output), unet_weights(again)
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)

    changed = [*reuse, "--overwrite", "--bucket_from_step", "2"]
    assert run_cli(main, changed) == 0
    third = json.loads((again / "build.json").read_text(encoding="utf-8"))
    assert third["reused_stages"] == ["vae", "fine_tune"]
    start = work / "ft" / "tiny-shapes-step00000002"
    assert f"--pretrained_model_name_or_path {start} " in third["bucket_stage_command"]
    assert third["settings"]["buckets"]["from_step"] == 2
    third_weights = unet_weights(again)
    assert not all(torch.equal(first_weights[k], third_weights[k]) for k in first_weights)


def test_packaged_tokenizer_matches_the_project_tokenizer(built):
    output, _, _ = built
    tokenizer = CLIPTokenizer.from_pretrained(output / "tokenizer")
    caption = "a red star on a gray background"
    assert tokenizer.model_max_length == 77
    assert tokenizer(caption).input_ids == load_packaged_tokenizer()(caption).input_ids


def test_existing_output_is_refused_without_overwrite(built, capsys):
    output, _, _ = built
    assert run_cli(main, ["--output_dir", str(output), *TOY]) == 2
    assert f"{output}: already exists; pass --overwrite" in capsys.readouterr().err


def test_vae_training_is_deterministic_from_its_seed(built, one_torch_thread):
    output, _, _ = built
    images = load_images([p for p in sorted((output.parent / "work" / "data" / "images").glob("*.png"))][:4])
    settings = VaeTrainSettings(channels=(8, 8, 8, 8), steps=2, batch_size=2, warmup_steps=1, seed=5)
    first, second = train_vae(images, settings, log_every=0), train_vae(images, settings, log_every=0)
    assert first["losses"] == second["losses"]
    assert first["scaling_factor"] == second["scaling_factor"]


def test_evaluate_only_rescores_the_built_model(built):
    output, record, _ = built
    argv = ["--output_dir", str(output), "--evaluate_only", "--eval_scale", "3", "--eval_steps", "2"]
    assert run_cli(main, [*argv, "--eval_seeds", "1", "--train_eval_count", "1"]) == 0
    again = json.loads((output / "build.json").read_text(encoding="utf-8"))
    assert again["quality"]["scale"] == 3.0
    assert again["quality"]["sizes"]["64x64"]["count"] == len(held_out_combinations())
    assert {k: v for k, v in again.items() if k not in ("quality", "runtime_s")} == {
        k: v for k, v in record.items() if k not in ("quality", "runtime_s")
    }
