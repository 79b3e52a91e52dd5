"""Flags that must reach the training step, observed inside real train_network.py runs on the tiny model: the
per-dataset ``network_multiplier``, ``--weighted_captions``, ``--initial_epoch`` and token warm-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import library.engine.launch as launch
import train_network
from library.dataset.loader import TrainDataset
from library.recipes.network import NetworkRecipe
from library.text.encode import encode_prompts
from tests.training import network_args, write_captioned_images, write_dataset_toml

TAGS = "frog, green, pond, leaf, sky"


class Recorder:
    """Spies on a run: the batches as loaded (in training order: no loader workers), the conditioning and the LoRA
    multipliers the UNet sees at each forward pass, and the loaded models."""

    def __init__(self, monkeypatch):
        self.batches: list[dict[str, Any]] = []
        self.conditioning: list[torch.Tensor] = []
        self.multipliers: list[set[float]] = []
        self.components = None
        real_load, real_batch, real_setup = launch.load_base_model, TrainDataset.load_batch, NetworkRecipe.setup
        recorder = self

        def load(args):
            recorder.components = real_load(args)
            return recorder.components

        def load_batch(dataset, plan):
            batch = real_batch(dataset, plan)
            recorder.batches.append(batch)
            return batch

        def setup(recipe, components, device, dtype):
            real_setup(recipe, components, device, dtype)
            loras = [m for m in recipe.network.modules() if hasattr(m, "lora_up")]

            def seen(module, args, kwargs):
                recorder.multipliers.append({m.multiplier for m in loras})
                states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
                recorder.conditioning.append(states.detach().clone())

            components.unet.register_forward_pre_hook(seen, with_kwargs=True)

        monkeypatch.setattr(launch, "load_base_model", load)
        monkeypatch.setattr(TrainDataset, "load_batch", load_batch)
        monkeypatch.setattr(NetworkRecipe, "setup", setup)

    def run(self, *argv: str) -> None:
        train_network.main([*argv, "--max_data_loader_n_workers", "0"])


def test_per_dataset_network_multiplier_reaches_every_lora_module(model_dir, tmp_path, monkeypatch):
    frogs = write_captioned_images(tmp_path / "frogs", ["a frog"] * 2, seed=1)
    cats = write_captioned_images(tmp_path / "cats", ["a cat"] * 2, seed=5)
    datasets = [
        {"resolution": 64, "network_multiplier": 0.5, "subsets": [{"image_dir": frogs.as_posix(), "num_repeats": 1}]},
        {"resolution": 64, "network_multiplier": 2.0, "subsets": [{"image_dir": cats.as_posix(), "num_repeats": 1}]},
    ]
    config = write_dataset_toml(tmp_path / "data.toml", datasets, general={"caption_extension": ".txt"})
    recorder = Recorder(monkeypatch)
    recorder.run(
        *network_args(model_dir, None, tmp_path / "out", "--dataset_config", str(config)), "--max_train_steps", "4"
    )
    assert len(recorder.batches) == len(recorder.multipliers) == 4
    expected = [{0.5} if "frogs" in batch["paths"][0] else {2.0} for batch in recorder.batches]
    assert recorder.multipliers == expected
    assert {0.5} in expected and {2.0} in expected


def test_weighted_captions_scale_the_token_states_and_keep_the_mean(model_dir, tmp_path, monkeypatch):
    """sd-scripts' rule: each token's state times its weight, then the prompt rescaled to its unweighted mean.
    ``(frog:1.5)`` weighs the one token of "frog" (position 2 after BOS and "a"). Without the flag the brackets are
    plain text."""
    data = tmp_path / "data"
    write_captioned_images(data / "1_frog", ["a (frog:1.5), green"])
    conditioning = {}
    for weighted in (True, False):
        recorder = Recorder(monkeypatch)
        flags = ["--weighted_captions"] if weighted else []
        out = tmp_path / f"out{weighted}"
        recorder.run(*network_args(model_dir, data, out, "--max_train_steps", "1", "--network_train_unet_only", *flags))
        conditioning[weighted] = recorder.conditioning[0]
        c = recorder.components
        with torch.no_grad():
            plain = encode_prompts(c.text_encoder, c.tokenizer, ["a frog, green"])
            literal = encode_prompts(c.text_encoder, c.tokenizer, ["a (frog:1.5), green"])
    ids = c.tokenizer("a frog, green").input_ids
    assert c.tokenizer.convert_ids_to_tokens(ids[2]) == "frog</w>"
    weights = torch.ones(plain.shape[1])
    weights[2] = 1.5
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(conditioning[True], expected, rtol=1e-5, atol=1e-5)
    assert (conditioning[True] - plain).abs().max() > 1e-2  # the weight really changed the states
    torch.testing.assert_close(conditioning[False], literal, rtol=1e-5, atol=1e-5)


def test_initial_epoch_starts_at_that_epoch(model_dir, tmp_path, monkeypatch):
    """--initial_epoch 3 of 4 (2 steps per epoch): epochs 3 and 4 are trained (4 steps), the epoch save is numbered
    3 and the 4th epoch is the final model."""
    data = tmp_path / "data"
    write_captioned_images(data / "1_frog", ["a frog", "a green frog"])
    recorder = Recorder(monkeypatch)
    out = tmp_path / "out"
    extra = ("--max_train_epochs", "4", "--initial_epoch", "3", "--save_every_n_epochs", "1")
    recorder.run(*network_args(model_dir, data, out, *extra))
    assert [b["epoch"] for b in recorder.batches] == [3, 3, 4, 4]
    assert sorted(p.name for p in out.iterdir()) == ["lora-000003.safetensors", "lora.safetensors", "lora_report.txt"]


def test_initial_epoch_counts_steps_from_the_epoch_it_starts_at(model_dir, tmp_path, monkeypatch):
    """Steps are numbered from the start of the whole run: epoch 3 of 2 steps each starts after step 4 (sd-scripts
    restarts at 0 without --skip_until_initial_step, so its step saves would be named 2 and 4; docs/differences.md)."""
    data = tmp_path / "data"
    write_captioned_images(data / "1_frog", ["a frog", "a green frog"])
    out = tmp_path / "out"
    extra = ("--max_train_epochs", "4", "--initial_epoch", "3", "--save_every_n_steps", "2")
    Recorder(monkeypatch).run(*network_args(model_dir, data, out, *extra))
    assert sorted(p.name for p in out.iterdir()) == [
        "lora-step00000006.safetensors",
        "lora-step00000008.safetensors",
        "lora.safetensors",
        "lora_report.txt",
    ]


def warmup_tag_counts(model_dir: Path, tmp_path: Path, monkeypatch, accumulation: int, steps: int) -> list[int]:
    data = tmp_path / "data"
    write_captioned_images(data / "1_frog", [TAGS] * 4)
    recorder = Recorder(monkeypatch)
    extra = ("--max_train_steps", str(steps), "--gradient_accumulation_steps", str(accumulation))
    warmup = ("--token_warmup_min", "1", "--token_warmup_step", "4")
    recorder.run(*network_args(model_dir, data, tmp_path / "out", *extra, *warmup))
    captions = [b["captions"][0] for b in recorder.batches]
    assert all(TAGS.startswith(caption) for caption in captions)
    return [len(caption.split(", ")) for caption in captions]


def test_token_warmup_adds_one_tag_per_step(model_dir, tmp_path, monkeypatch):
    """5 tags from 1 over 4 steps: floor(step * (5 - 1) / 4) + 1 tags at step 0, 1, 2, 3, then all of them."""
    assert warmup_tag_counts(model_dir, tmp_path, monkeypatch, accumulation=1, steps=5) == [1, 2, 3, 4, 5]


def test_token_warmup_counts_optimizer_steps_with_gradient_accumulation(model_dir, tmp_path, monkeypatch):
    """sd-scripts advances the warm-up per optimizer step, so two accumulated batches see the same tag count."""
    counts = warmup_tag_counts(model_dir, tmp_path, monkeypatch, accumulation=2, steps=4)
    assert counts == [1, 1, 2, 2, 3, 3, 4, 4]
