"""fine_tune.py end to end: metadata JSON and TOML subsets, saving, step-exact resume, --train_text_encoder,
--from_scratch_config, and the worked example of docs/fine_tune.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fine_tune
import library.engine.launch as launch
from library.cli import run_cli
from library.errors import UserError
from library.models.components import Components
from library.models.load import load_model
from library.models.scratch import scratch_model
from library.models.tiny import make_tiny_model
from tests.test_train_db import run_docs_example
from tests.training import model_weights, run_args, same_tensors, write_captioned_images, write_dataset_toml


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``images/`` with three pictures and ``meta.json`` captioning them (sd-scripts' metadata layout)."""
    root = tmp_path_factory.mktemp("ft")
    write_captioned_images(root / "images", [None] * 3, seed=20, stem="p")
    meta = {f"p{i}": {"caption": f"a painting of a cat, number {i}", "tags": "cat, painting"} for i in range(3)}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def ft_args(out: Path, *extra: str) -> list[str]:
    return [*run_args(out, name="ft", learning_rate="1e-3", seed=7), *extra]


def in_json(data: Path) -> list[str]:
    return ["--in_json", str(data / "meta.json"), "--train_data_dir", str(data / "images")]


def loaded_models(monkeypatch) -> list[Components]:
    """The models the entry script loads, collected as it loads them: after the run they hold the trained weights
    in memory."""
    loaded: list[Components] = []
    real = launch.load_base_model

    def load(source):
        loaded.append(real(source))
        return loaded[-1]

    monkeypatch.setattr(launch, "load_base_model", load)
    return loaded


def check_saved_weights(saved: dict, base: dict, in_memory: Components, trained: set[str]) -> None:
    """The saved file holds exactly the trained in-memory weights; every tensor of a trained model moved from the
    base, every tensor of the others is bit-identical to it."""
    for name in ("unet", "text_encoder", "vae"):
        memory = getattr(in_memory, name).state_dict()
        assert same_tensors(saved[name], dict(memory)), name
        unchanged = [k for k in memory if torch.equal(memory[k], base[name][k])]
        assert unchanged == ([] if name in trained else list(memory)), name


def test_in_json_with_text_encoder_saved_as_ckpt(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    loaded = loaded_models(monkeypatch)
    argv = ft_args(out, "--pretrained_model_name_or_path", str(model_dir), *in_json(data), "--max_train_steps", "2")
    fine_tune.main([*argv, "--train_text_encoder", "--learning_rate_te", "5e-4", "--save_model_as", "ckpt"])
    assert sorted(p.name for p in out.iterdir()) == ["ft.ckpt", "ft_report.txt"]
    check_saved_weights(model_weights(out / "ft.ckpt"), model_weights(model_dir), loaded[0], {"unet", "text_encoder"})


def test_toml_metadata_subset_trains_unet_only_by_default(model_dir, data, tmp_path, monkeypatch):
    subset = {"image_dir": (data / "images").as_posix(), "metadata_file": (data / "meta.json").as_posix()}
    datasets = [{"resolution": 64, "batch_size": 3, "subsets": [subset]}]
    config = write_dataset_toml(tmp_path / "dataset.toml", datasets)
    out = tmp_path / "out"
    loaded = loaded_models(monkeypatch)
    argv = ft_args(out, "--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(config))
    fine_tune.main([*argv, "--max_train_steps", "1", "--save_model_as", "diffusers_safetensors"])
    assert sorted(p.name for p in out.iterdir()) == ["ft", "ft_report.txt"]
    check_saved_weights(model_weights(out / "ft"), model_weights(model_dir), loaded[0], {"unet"})


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_data_dir", "{data}/images"], "error: --train_data_dir: DreamBooth-style datasets"),
        (["--dataset_config", "{db_toml}"], "error: "),
        (["--from_scratch_config", "tiny-sd1", "--pretrained_model_name_or_path", "tiny-sd1"], "error: --from_scratch"),
        (["--from_scratch_config", "{data}/images"], "error: --from_scratch_config"),
    ],
)
def test_refuses_dreambooth_data_and_bad_model_flags(data, tmp_path, capsys, extra, message):
    db_toml = write_dataset_toml(tmp_path / "db.toml", [{"subsets": [{"image_dir": (data / "images").as_posix()}]}])
    argv = [a.format(data=data, db_toml=db_toml) for a in extra]
    if "--pretrained_model_name_or_path" not in argv and "--from_scratch_config" not in argv:
        argv += ["--pretrained_model_name_or_path", "tiny-sd1"]
    if "--dataset_config" not in argv and "--train_data_dir" not in argv:
        argv += in_json(data)
    assert run_cli(fine_tune.main, ft_args(tmp_path / "out", *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(message)
    if "db.toml" in " ".join(argv):
        assert "DreamBooth" in err and "not supported by this script" in err and "fine-tuning" in err
    assert not (tmp_path / "out").exists()


def test_resume_is_step_exact_with_text_encoder_groups(model_dir, data, tmp_path):
    common = ["--pretrained_model_name_or_path", str(model_dir), *in_json(data), "--max_train_steps", "4"]
    common += ["--train_text_encoder", "--learning_rate_te", "2e-4", "--save_model_as", "safetensors"]
    straight = tmp_path / "straight"
    fine_tune.main(ft_args(straight, *common, "--save_every_n_steps", "2", "--save_state"))
    resumed = tmp_path / "resumed"
    fine_tune.main(ft_args(resumed, *common, "--resume", str(straight / "ft-step00000002-state")))
    a, b = model_weights(straight / "ft.safetensors"), model_weights(resumed / "ft.safetensors")
    assert same_tensors(a["unet"], b["unet"]) and same_tensors(a["text_encoder"], b["text_encoder"])
    half = model_weights(straight / "ft-step00000002.safetensors")
    assert not same_tensors(half["unet"], a["unet"]) and not same_tensors(half["text_encoder"], a["text_encoder"])


def test_from_scratch_config_trains_a_model_from_nothing(data, tmp_path):
    out = tmp_path / "out"
    fine_tune.main(
        ft_args(out, "--from_scratch_config", "tiny-sd1", *in_json(data), "--max_train_steps", "2")
        + ["--train_text_encoder", "--save_model_as", "safetensors"]
    )
    init = scratch_model("tiny-sd1", seed=7)
    trained = model_weights(out / "ft.safetensors")
    assert trained["unet"].keys() == init.unet.state_dict().keys()
    assert not same_tensors(dict(init.unet.state_dict()), trained["unet"])
    assert not same_tensors(dict(init.text_encoder.state_dict()), trained["text_encoder"])
    assert same_tensors(dict(init.vae.state_dict()), trained["vae"])
    assert not same_tensors(dict(make_tiny_model().vae.state_dict()), trained["vae"])


def test_scratch_model_from_a_config_folder(model_dir):
    base = load_model(model_dir)
    fresh = scratch_model(str(model_dir), seed=1)
    unet_config = {k: v for k, v in base.unet.config.items() if k != "_name_or_path"}
    assert dict(fresh.unet.config) == unet_config and fresh.family.name == "sd1"
    assert fresh.tokenizer.model_max_length == 77
    assert fresh.text_encoder.config.hidden_size == base.text_encoder.config.hidden_size
    for name in ("unet", "text_encoder", "vae"):
        ours, theirs = getattr(fresh, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert not same_tensors(dict(ours), dict(theirs))
    again = scratch_model(str(model_dir), seed=1)
    assert same_tensors(dict(fresh.unet.state_dict()), dict(again.unet.state_dict()))
    assert scratch_model("tiny-sd2", seed=0).family.v2 is True


def test_scratch_model_names_the_missing_config(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"missing vae/config.json"):
        scratch_model(str(tmp_path), seed=0)


def test_docs_example_runs(tmp_path):
    out = run_docs_example("fine_tune.md", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["frog-ft.safetensors", "frog-ft_report.txt", "meta.json"]
    base, trained = model_weights("tiny-sd1"), model_weights(out / "frog-ft.safetensors")
    for name in ("unet", "text_encoder"):  # the example trains both (--train_text_encoder)
        assert all(not torch.equal(trained[name][k], base[name][k]) for k in base[name]), name
    assert same_tensors(trained["vae"], base["vae"])
