"""Weights that became NaN/inf are never saved, even when no loss was NaN first: the run stops with one line."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import train_network
from library.cli import run_cli
from library.engine.step import weights_finite
from tests.training import network_args, write_frog_dataset


class InfAtThirdStep(torch.optim.SGD):
    """Plain SGD that writes inf into one trained weight at its third step (as an overflowing optimizer would)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps == 3:
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return loss


OPTIMIZER = f"{__name__}.InfAtThirdStep"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def test_weights_finite():
    assert weights_finite([torch.ones(3), torch.zeros(2, 2)])
    assert weights_finite([])
    assert not weights_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not weights_finite([torch.tensor([float("nan")], dtype=torch.bfloat16)])


@pytest.mark.parametrize(
    "steps, every, refused, kept",
    [
        # the final save: its state comes first, so that is the file named; the step-2 saves stay
        ("3", "2", "lora-state", ["lora-step00000002-state", "lora-step00000002.safetensors"]),
        # a periodic save: the step-3 model is refused; training stops there (step 4 never runs)
        ("4", "3", "lora-step00000003.safetensors", []),
    ],
)
def test_non_finite_weights_stop_the_run_before_saving(
    model_dir, data_dir, tmp_path, capsys, steps, every, refused, kept
):
    out = tmp_path / "out"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    flags = ["--max_train_steps", steps, "--save_every_n_steps", every, "--save_state", "--optimizer_type", OPTIMIZER]
    code = run_cli(train_network.main, network_args(model_dir, data_dir, out, *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        f"error: the trained weights hold NaN/inf at step 3, so {refused} was not saved: likely the learning rate is "
        "too high or its schedule is broken (check --learning_rate, --unet_lr/--text_encoder_lr, --lr_scheduler and "
        "its options). Training stopped; earlier saves are kept"
    )
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else []) == kept
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
