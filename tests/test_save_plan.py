"""SavePlan: which epochs and steps write a model or state, under which names, and which old ones are removed
(sd-scripts' ``get_remove_epoch_no`` / ``get_remove_step_no`` and the state variants), worked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.saving import SavePlan

OUT = Path("/out")


def test_names_with_and_without_output_name():
    plan = SavePlan(OUT, "run")
    assert plan.epoch_model(3) == OUT / "run-000003.safetensors"
    assert plan.step_model(40) == OUT / "run-step00000040.safetensors"
    assert plan.last_model() == OUT / "run.safetensors"
    assert plan.epoch_state(3) == OUT / "run-000003-state"
    assert plan.step_state(40) == OUT / "run-step00000040-state"
    assert plan.last_state() == OUT / "run-state"
    unnamed = SavePlan(OUT, None, extension=".ckpt")
    assert unnamed.epoch_model(12) == OUT / "epoch-000012.ckpt"
    assert unnamed.step_model(7) == OUT / "at-step00000007.ckpt"
    assert unnamed.last_model() == OUT / "last.ckpt"
    assert (unnamed.epoch_state(12), unnamed.step_state(7), unnamed.last_state()) == (
        OUT / "epoch-000012-state",
        OUT / "at-step00000007-state",
        OUT / "last-state",
    )


def test_epoch_saves_skip_the_final_epoch():
    every2 = SavePlan(OUT, "x", every_n_epochs=2)
    assert [e for e in range(1, 8) if every2.saves_at_epoch_end(e, 7)] == [2, 4, 6]
    assert [e for e in range(1, 7) if every2.saves_at_epoch_end(e, 6)] == [2, 4]  # 6 is written as the last model
    assert not any(SavePlan(OUT, "x").saves_at_epoch_end(e, 5) for e in range(1, 6))


def test_step_saves_include_the_final_step():
    every3 = SavePlan(OUT, "x", every_n_steps=3)
    assert [s for s in range(1, 10) if every3.saves_at_step(s)] == [3, 6, 9]
    assert not any(SavePlan(OUT, "x").saves_at_step(s) for s in range(1, 10))


def test_last_n_epochs_counts_saves():
    """--save_last_n_epochs 2 with saves every 2 epochs: saving epoch 6 removes epoch 2 (6 - 2 * 2)."""
    plan = SavePlan(OUT, "x", every_n_epochs=2, last_n_epochs=2)
    assert [plan.stale_epoch_model(e) for e in (2, 4, 6, 8)] == [None, None, plan.epoch_model(2), plan.epoch_model(4)]
    assert SavePlan(OUT, "x", every_n_epochs=2).stale_epoch_model(8) is None  # nothing kept-limited


def test_last_n_steps_counts_steps_not_files():
    """sd-scripts' example: saves every 10 steps and 30 steps kept; saving step 50 removes step 10."""
    plan = SavePlan(OUT, "x", every_n_steps=10, last_n_steps=30)
    assert [plan.stale_step_model(s) for s in (10, 20, 30, 40)] == [None] * 4
    assert plan.stale_step_model(50) == plan.step_model(10)
    assert plan.stale_step_model(60) == plan.step_model(20)
    odd = SavePlan(OUT, "x", every_n_steps=2, last_n_steps=2)  # 6 - 2 - 1 = 3, rounded down to a save: 2
    assert [odd.stale_step_model(s) for s in (2, 4, 6)] == [None, None, odd.step_model(2)]


@pytest.mark.parametrize("state_n, model_n, removed_at_5", [(None, 3, 2), (1, 3, 4), (2, None, 3), (None, None, None)])
def test_epoch_states_keep_their_own_count_or_the_models(state_n, model_n, removed_at_5):
    """--save_last_n_epochs_state wins over --save_last_n_epochs, which states otherwise follow."""
    plan = SavePlan(OUT, "x", every_n_epochs=1, last_n_epochs=model_n, last_n_epochs_state=state_n)
    expected = None if removed_at_5 is None else plan.epoch_state(removed_at_5)
    assert plan.stale_epoch_state(5) == expected
    assert plan.stale_epoch_model(5) == (None if model_n is None else plan.epoch_model(5 - model_n))


@pytest.mark.parametrize("state_n, model_n, removed_at_8", [(None, 4, 2), (2, 4, 4), (3, None, 4), (None, None, None)])
def test_step_states_keep_their_own_count_or_the_models(state_n, model_n, removed_at_8):
    """Saves every 2 steps: at step 8, n kept steps remove step 8 - n - 1 rounded down to a multiple of 2."""
    plan = SavePlan(OUT, "x", every_n_steps=2, last_n_steps=model_n, last_n_steps_state=state_n)
    assert plan.stale_step_state(8) == (None if removed_at_8 is None else plan.step_state(removed_at_8))
