"""Validation loss: the held-out split (deterministic, disjoint from training, independent of --seed, is_val
subsets), the validation dataset without augmentations, and the Validator's fixed-timestep, fixed-noise loss checked
against a hand-written computation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from library.config.dataset_config import DatasetFlags
from library.dataset.loader import build_datasets
from library.dataset.summary import summarize_dataset
from library.dataset.validation import held_out_count
from library.engine.step import StepModels
from library.engine.validation import ValidationSettings, Validator, validation_timesteps
from library.engine.wiring import parts_from_settings
from library.errors import UserError
from library.losses import LossSettings
from library.models.tiny import make_tiny_model
from library.noise import NoiseSettings, training_scheduler
from library.optimizers import OptimizerSettings
from library.schedulers import LRSchedulerSettings
from library.seeds import step_generator
from library.text.encode import TextEncodingSettings
from tests.images import write_image
from tests.training import write_dataset_toml


def write_folder(folder: Path, count: int, seed: int) -> Path:
    for i in range(count):
        write_image(folder / f"{i}.png", seed=seed + i)
        (folder / f"{i}.txt").write_text(f"red, green, blue, picture {seed + i}")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    write_folder(root / "one" / "img", 6, seed=0)
    write_folder(root / "two" / "img", 6, seed=10)  # same folder name: "img (2)"
    write_folder(root / "held", 2, seed=20)
    write_folder(root / "reg", 3, seed=30)
    return root


def config(root: Path, **dataset) -> Path:
    augment = {"flip_aug": True, "shuffle_caption": True, "caption_dropout_rate": 0.5, "caption_extension": ".txt"}
    subsets = [
        {"image_dir": str(root / "one" / "img"), **augment},
        {"image_dir": str(root / "two" / "img"), **augment},
        {"image_dir": str(root / "held"), "is_val": True, "loss_weight": 2.0, **augment},
        {"image_dir": str(root / "reg"), "is_reg": True, "caption_extension": ".txt"},
    ]
    entry = {"resolution": 64, "batch_size": 2, "validation_split": 0.34, "subsets": subsets} | dataset
    return write_dataset_toml(root / f"d{len(list(root.glob('d*.toml')))}.toml", [entry])


def build(root: Path, seed: int = 1, vae=None, **dataset):
    flags = DatasetFlags(dataset_config=str(config(root, **dataset)), cache_latents=vae is not None)
    return build_datasets(flags, {"dreambooth"}, vae, seed=seed, progress=False)


def paths(dataset) -> set[str]:
    return {str(r.path) for recs in dataset.records for r in recs}


def test_held_out_count_rounds_keeps_one_and_never_takes_all():
    assert [held_out_count(n, s) for n, s in [(10, 0.1), (2, 0.01), (1, 0.5), (5, 0.99), (4, 0.0), (7, 0.5)]] == [
        1,
        1,
        0,
        4,
        0,
        4,
    ]


def test_split_is_deterministic_disjoint_independent_of_seed_and_respects_is_val(data):
    train, val = build(data, seed=1)
    train2, val2 = build(data, seed=999)
    held = paths(val)
    assert held == paths(val2) and paths(train) == paths(train2)
    assert not held & paths(train)
    assert {p for p in held if "/held/" in p} == {str(data / "held" / f"{i}.png") for i in range(2)}
    assert sum("/one/" in p for p in held) == 2 and sum("/two/" in p for p in held) == 2
    assert not any("/reg/" in p for p in held)  # regularization images are never held out (sd-scripts)
    assert len(paths(train)) == 4 + 4 + 3
    # training sees no is_val subset; names come from the folders, the repeated "img" gets a suffix
    assert train.subset_names == [["img", "img (2)", "reg"]] and val.subset_names == [["img", "img (2)", "held", "reg"]]
    assert [s.is_val for s in train.datasets[0].subsets] == [False, False, False]
    for epoch in (1, 2, 3):
        for plan in train.batch_plan(epoch):
            batch = train.load_batch(plan)
            assert not set(batch["paths"]) & held
            assert batch["subsets"] == [
                ("reg" if "/reg/" in p else "img (2)" if "/two/" in p else "img") for p in batch["paths"]
            ]
    assert summarize_dataset(train).text.splitlines()[0].startswith("images: 8 train, 3 regularization")
    # another validation_seed holds out other images
    _, other = build(data, validation_seed=12345)
    assert paths(other) != held and len(paths(other)) == len(held)


def test_validation_batches_have_no_augmentation_and_full_captions(data):
    _, val = build(data)
    subset = val.datasets[0].subsets[0]
    assert (subset.flip_aug, subset.shuffle_caption, subset.caption_dropout_rate, subset.num_repeats) == (
        False,
        False,
        0.0,
        1,
    )
    plans = val.batch_plan(1)
    assert sum(len(p.items) for p in plans) == 6  # each held-out image once
    for plan in plans:
        batch = val.load_batch(plan)
        assert batch["flipped"] == [False] * len(plan.items)
        assert batch["captions"] == [Path(p).with_suffix(".txt").read_text() for p in batch["paths"]]
    assert [b.items for b in val.batch_plan(1)] == [b.items for b in build(data, seed=5)[1].batch_plan(1)]


def test_bad_subsets_are_one_line_errors(data):
    with pytest.raises(UserError, match="is_reg and is_val are both true"):
        build_datasets(
            DatasetFlags(
                dataset_config=str(
                    write_dataset_toml(
                        data / "bad.toml",
                        [{"subsets": [{"image_dir": str(data / "held"), "is_val": True, "is_reg": True}]}],
                    )
                )
            ),
            {"dreambooth"},
            seed=1,
        )
    only_val = write_dataset_toml(
        data / "only.toml", [{"subsets": [{"image_dir": str(data / "held"), "is_val": True}]}]
    )
    with pytest.raises(UserError, match="every image is held out for validation"):
        build_datasets(DatasetFlags(dataset_config=str(only_val)), {"dreambooth"}, seed=1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return make_tiny_model()


def validator_and_parts(val, components, timesteps=(250, 750), max_steps=None):
    parts = parts_from_settings(
        components,
        text=TextEncodingSettings(),
        noise=NoiseSettings(),
        loss=LossSettings(),
        optimizer=OptimizerSettings(),
        schedule=LRSchedulerSettings(),
        sample=None,
    )
    scheduler = training_scheduler(components.scheduler)
    validator = Validator(
        val, seed=val.seed, max_steps=max_steps, timesteps=timesteps, scheduler=scheduler, v_parameterization=False
    )
    c = components
    models = StepModels(c.unet, c.text_encoders, c.tokenizers, c.vae, c.family.latent_scale(c.vae))
    return validator, parts, models


def run(validator, parts, models) -> dict[str, float]:
    return validator.run(
        models,
        parts,
        device=torch.device("cpu"),
        weight_dtype=torch.float32,
        autocast=contextlib.nullcontext,
    )


def test_validator_is_repeatable_leaves_the_global_rng_alone_and_reports_each_subset(data, tiny):
    _, val = build(data, vae=tiny.vae)
    assert val.latents is not None and len(val.latents) == 6  # cached like the training images
    validator, parts, models = validator_and_parts(val, tiny)
    assert len(validator) == 3 * 2
    models.unet.train()  # as in training: the validator runs it in eval mode and puts it back
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    first = run(validator, parts, models)
    assert torch.equal(torch.random.get_rng_state(), before)  # no global draw consumed
    assert set(first) == {"", "img", "img (2)", "held"}
    torch.rand(1000)  # the training RNG moves on
    assert run(validator, parts, models) == first
    again, _, _ = validator_and_parts(build(data, seed=77, vae=tiny.vae)[1], tiny)  # another training seed
    assert run(again, parts, models) == first
    assert models.unet.training and models.unet.conv_out.training
    count = {"img": 2, "img (2)": 2, "held": 2}
    overall = sum(first[k] * n for k, n in count.items()) / 6
    assert first[""] == pytest.approx(overall, rel=1e-6)


def test_validator_equals_a_hand_written_loss_at_the_fixed_timestep(data, tiny):
    _, val = build(data, vae=tiny.vae)
    validator, parts, models = validator_and_parts(val, tiny, timesteps=(500,), max_steps=1)
    got = run(validator, parts, models)
    batch = val.load_batch(val.batch_plan(1)[0])
    c = tiny
    latents = batch["latents"] * c.family.latent_scale(c.vae)
    noise = torch.randn(latents.shape, generator=step_generator(val.seed, "validation", 0, 0))
    timesteps = torch.full((latents.shape[0],), 500)
    noisy = c.scheduler.add_noise(latents, noise, timesteps)
    (tokenizer,), (text_encoder,) = c.tokenizers, c.text_encoders
    ids = tokenizer(batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = text_encoder(ids.input_ids).last_hidden_state
        pred = c.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    losses = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    weights = [2.0 if name == "held" else 1.0 for name in batch["subsets"]]
    losses = losses * torch.tensor(weights)
    expected: dict[str, list[float]] = {}
    for name, value in zip(batch["subsets"], losses.tolist()):
        expected.setdefault(name, []).append(value)
    assert set(got) == {"", *expected}
    for name, values in expected.items():
        assert got[name] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert got[""] == pytest.approx(float(losses.mean()), rel=1e-5)


def test_validation_timesteps_and_schedule_follow_sd_scripts():
    assert validation_timesteps(0, 1000) == (200, 400, 600, 800)
    assert validation_timesteps(100, 600, 4) == (200, 300, 400, 500)
    assert validation_timesteps(500, 500) == (500,)
    every = ValidationSettings(validate_every_n_steps=3, validate_every_n_epochs=2)
    assert [every.due_after_step(s) for s in (1, 3, 6)] == [False, True, True]
    assert [every.due_after_epoch(e) for e in (1, 2)] == [False, True]
    assert ValidationSettings().due_after_epoch(1) and not ValidationSettings().due_after_step(1)


def test_train_network_never_trains_on_or_counts_the_held_out_images(model_dir, data, tmp_path, caplog):
    import json
    import logging

    import train_network
    from library.io import load_safetensors
    from tests.training import network_args

    toml = config(data, validation_split=0.5)
    argv = network_args(model_dir, None, tmp_path, "--dataset_config", str(toml), "--max_train_steps", "1")
    with caplog.at_level(logging.INFO):
        train_network.main([*argv, "--cache_latents", "--network_train_unet_only"])
    metadata = load_safetensors(tmp_path / "lora.safetensors")[1]
    counts = {k: v["img_count"] for k, v in json.loads(metadata["ss_dataset_dirs"]).items()}
    assert counts == {"img": 3, "img (2)": 3}  # 6 - 3 held out per folder; no "held" (is_val)
    assert metadata["ss_num_validation_images"] == "8"  # 3 + 3 split off, 2 is_val
    assert "validation: 8 image(s) held out" in caplog.text
    assert "not implemented yet" not in caplog.text


def validation_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``loss/validation*`` scalar of the one TensorBoard run under ``logs``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("loss/validation"):
                values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return values


def test_the_loop_logs_validation_per_subset_the_same_after_a_resume_and_without_touching_training(
    model_dir, data, tmp_path
):
    from safetensors.torch import load_file

    import train_network
    from tests.training import network_args

    toml = config(data)

    def args(out: Path, *extra: str) -> list[str]:
        flags = ["--dataset_config", str(toml), "--network_train_unet_only", "--logging_dir", str(out / "logs")]
        return network_args(model_dir, None, out, *flags, *extra)

    validate = ["--validate_every_n_steps", "2", "--validate_every_n_epochs", "50", "--max_validation_steps", "2"]
    train_network.main(args(tmp_path / "a", "--max_train_steps", "4", *validate))
    straight = validation_scalars(tmp_path / "a" / "logs")
    assert set(straight) == {
        "loss/validation",
        "loss/validation/img",
        "loss/validation/img (2)",
        "loss/validation/held",
    }
    assert [step for step, _ in straight["loss/validation"]] == [2, 4]
    assert straight["loss/validation"][0][1] != straight["loss/validation"][1][1]
    train_network.main(args(tmp_path / "b", "--max_train_steps", "2", "--save_state", *validate))
    train_network.main(
        args(tmp_path / "b", "--max_train_steps", "4", "--resume", str(tmp_path / "b" / "lora-state"), *validate)
    )
    assert validation_scalars(tmp_path / "b" / "logs") == straight
    train_network.main(args(tmp_path / "c", "--max_train_steps", "4", "--validate_every_n_epochs", "50"))
    assert validation_scalars(tmp_path / "c" / "logs") == {}
    a, c = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "c" / "lora.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
