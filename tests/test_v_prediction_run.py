"""A v-prediction (SD 2.x) LoRA run through the real entry script and ``parts_from_args``: the model is trained to
predict v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0, and the loss is the MSE against it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import library.engine.launch as launch
import library.engine.wiring as wiring
import train_network
from tests.training import network_args, write_frog_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


def record_run(monkeypatch, argv: list[str]) -> tuple[list, list]:
    """Run train_network.py; return (the loaded models, (loss inputs, per-sample loss) of every batch)."""
    loaded, seen = [], []
    real_load, real_loss = launch.load_base_model, wiring._loss

    def load(source):
        loaded.append(real_load(source))
        return loaded[-1]

    def loss(inputs, **kwargs):
        result = real_loss(inputs, **kwargs)
        seen.append((inputs, result.detach()))
        return result

    monkeypatch.setattr(launch, "load_base_model", load)
    monkeypatch.setattr(wiring, "_loss", loss)
    train_network.main(argv)
    return loaded, seen


@pytest.mark.parametrize("v_prediction", [True, False])
def test_the_target_is_v_and_the_loss_is_the_mse_against_it(monkeypatch, data_dir, tmp_path, v_prediction):
    """tiny-sd2 with --v2 --v_parameterization against tiny-sd1 (epsilon), the control."""
    model, flags = ("tiny-sd2", ["--v2", "--v_parameterization"]) if v_prediction else ("tiny-sd1", [])
    argv = network_args(model, data_dir, tmp_path / "out", "--max_train_steps", "2", *flags)
    loaded, seen = record_run(monkeypatch, argv)
    components = loaded[0]
    assert components.family.v2 is v_prediction and components.v_parameterization is v_prediction
    assert len(seen) == 2
    alphas_cumprod = components.scheduler.alphas_cumprod
    for inputs, per_sample in seen:
        a = alphas_cumprod[inputs.timesteps].view(-1, 1, 1, 1)
        x0, noise = inputs.latents.float(), inputs.noise.float()
        torch.testing.assert_close(inputs.noisy_latents.float(), a.sqrt() * x0 + (1 - a).sqrt() * noise)
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        expected_target = v if v_prediction else noise
        torch.testing.assert_close(inputs.target.float(), expected_target, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(v, noise, atol=1e-2)  # v and epsilon targets really differ here
        mse = (inputs.model_pred.float() - expected_target).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(per_sample, mse, rtol=1e-5, atol=1e-7)
    assert (tmp_path / "out" / "lora.safetensors").is_file()
