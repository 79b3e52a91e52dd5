"""Per-subset ``loss_weight``: read from the TOML (ascending like other subset keys), multiplied into each sample's
``loss_weights`` (reg subsets: prior_loss_weight x loss_weight) and so into the step's loss, exactly."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from library.config.dataset_config import DatasetFlags, load_dataset_configs
from library.dataset.loader import TrainDataset
from library.dataset.scan import scan_dataset
from library.engine.parts import TrainingParts
from library.engine.step import StepModels, batch_loss
from library.errors import UserError
from library.models.family import Conditioning
from tests.images import write_image


def write_dataset(tmp_path: Path, extra: str = "") -> Path:
    for folder, count in (("a", 2), ("b", 2), ("reg", 4)):
        for n in range(count):
            write_image(tmp_path / folder / f"{folder}{n}.png", (16, 16), seed=n)
    path = tmp_path / "data.toml"
    path.write_text(
        f"[general]\nloss_weight = 0.5\n{extra}\n[[datasets]]\nresolution = 16\nbatch_size = 8\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\nloss_weight = 1.0\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'b'}'\nloss_weight = 0.25\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'reg'}'\nis_reg = true\n"
    )
    return path


def dataset(tmp_path: Path, prior_loss_weight: float = 0.3) -> TrainDataset:
    configs = load_dataset_configs(DatasetFlags(dataset_config=str(write_dataset(tmp_path))), {"dreambooth"})
    return TrainDataset(configs, [scan_dataset(configs[0]).records], seed=4, prior_loss_weight=prior_loss_weight)


class EchoUnet(nn.Module):
    """Predicts its input, so each sample's MSE against a zero target is the mean of its latents squared."""

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=noisy)


def test_loss_weights_are_subset_weight_times_prior_weight_for_reg(tmp_path):
    """a: 1, b: 0.25, reg: [general]'s 0.5 x prior_loss_weight 0.3 = 0.15 (floats multiplied as the loader does)."""
    train = dataset(tmp_path)
    assert [s.loss_weight for s in train.datasets[0].subsets] == [1.0, 0.25, 0.5]
    (plan,) = train.batch_plan(1)
    batch = train.load_batch(plan)
    expected = {"a": 1.0, "b": 0.25, "reg": 0.3 * 0.5}
    weights = torch.tensor([expected[Path(p).parent.name] for p in batch["paths"]], dtype=torch.float32)
    assert sorted(Path(p).parent.name for p in batch["paths"]) == ["a", "a", "b", "b", "reg", "reg", "reg", "reg"]
    assert torch.equal(batch["loss_weights"], weights)


def test_the_steps_loss_is_the_weighted_mean_of_the_per_sample_losses(tmp_path):
    train = dataset(tmp_path)
    batch = train.load_batch(train.batch_plan(1)[0])
    size = len(batch["paths"])
    values = torch.arange(1.0, size + 1)
    batch["latents"] = values.view(-1, 1, 1, 1).expand(size, 4, 2, 2).clone()
    parts = TrainingParts(
        encode_text=lambda encoders, tokenizers, captions, b: Conditioning(torch.zeros(len(captions), 1, 1)),
        add_noise=lambda latents, g: (latents, torch.zeros_like(latents), torch.zeros(len(latents)), latents * 0),
        loss=lambda inputs: ((inputs.model_pred - inputs.target) ** 2).mean(dim=(1, 2, 3)),
        make_optimizer=lambda groups, steps: (None, None),
    )
    result = batch_loss(
        batch,
        models=StepModels(EchoUnet(), [], [], nn.Identity(), 1.0),
        parts=parts,
        autocast=contextlib.nullcontext(),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        weight_dtype=torch.float32,
        train_text_encoder=False,
        step=0,
    )
    by_hand = sum(v * v * w for v, w in zip(values.tolist(), batch["loss_weights"].tolist())) / size
    assert result.loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand != pytest.approx(float((values**2).mean()))  # the weights matter here


@pytest.mark.parametrize(
    "extra, message", [("loss_weight = -1", "must be a number of at least 0, got -1"), ("loss_weight = 'x'", "number")]
)
def test_bad_loss_weight_is_a_one_line_error(tmp_path, extra, message):
    path = write_dataset(tmp_path)
    path.write_text(path.read_text().replace("loss_weight = 0.5", extra))
    with pytest.raises(UserError, match="general: key 'loss_weight'") as info:
        load_dataset_configs(DatasetFlags(dataset_config=str(path)), {"dreambooth"})
    assert message in str(info.value)
