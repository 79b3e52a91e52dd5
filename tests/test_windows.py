"""--text_encoder_train_until / --unet_train_until: a part stops learning at a step or epoch (its weights then stay
bit for bit), the rest trains on, and a resumed run stops it at the same step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.engine.windows import TrainingWindows, TrainUntil, WindowSettings
from library.errors import UserError
from tests.training import network_args, write_frog_dataset


@pytest.mark.parametrize(
    ("text", "count", "unit", "end"),
    [("500", 500, "steps", 500), ("12steps", 12, "steps", 12), ("1 step", 1, "steps", 1), ("3epochs", 3, "epochs", 21)],
)
def test_windows_read_steps_or_epochs(text, count, unit, end):
    window = TrainUntil.parse(text, "unet_train_until")
    assert (window.count, window.unit, window.end_step(steps_per_epoch=7)) == (count, unit, end)


@pytest.mark.parametrize("text", ["3e", "-1", "two", "3 minutes", ""])
def test_bad_windows_are_one_line_errors(text):
    with pytest.raises(UserError, match=rf"^--text_encoder_train_until {text}: write a number of steps"):
        WindowSettings(text_encoder_train_until=text).windows()


def test_a_window_on_a_part_the_run_does_not_train_is_refused():
    with pytest.raises(UserError, match="^--unet_train_until: this run trains no unet weights; drop the flag$"):
        TrainingWindows({"unet": TrainUntil(2, "steps")}, {"text_encoder": [torch.nn.Parameter(torch.ones(1))]}, 4)


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix) and not k.endswith(".alpha")}


def test_each_part_stops_at_its_window_and_a_resume_stops_it_at_the_same_step(model_dir, tmp_path, caplog):
    data = write_frog_dataset(tmp_path / "data")  # 4 images: 4 steps per epoch
    windows = ["--unet_train_until", "2steps", "--text_encoder_train_until", "1epochs", "--max_train_steps", "6"]

    def run(out, *extra):
        train_network.main(network_args(model_dir, data, out, "--save_every_n_steps", "1", *windows, *extra))

    with caplog.at_level("INFO", logger="sdtrain"):
        run(tmp_path / "straight")
    assert "unet stops training at step 2 (--unet_train_until 2steps)" in caplog.text
    assert "every trained part's window has ended at step 4: nothing is left to train, stopping" in caplog.text
    files = {s: load_file(tmp_path / "straight" / f"lora-step{s:08d}.safetensors") for s in range(1, 5)}
    assert not (tmp_path / "straight" / "lora-step00000005.safetensors").exists()
    final = load_file(tmp_path / "straight" / "lora.safetensors")
    assert all(torch.equal(final[k], files[4][k]) for k in final)
    for prefix, stops in (("lora_unet_", 2), ("lora_te_", 4)):
        before = [part(files[s], prefix) for s in range(1, stops + 1)]
        ups = [k for k in before[0] if "lora_up" in k]
        assert sum(not torch.equal(before[-2][k], before[-1][k]) for k in ups) >= 0.9 * len(ups)  # still learning
        after = [part(files[s], prefix) for s in range(stops, 5)]
        assert all(torch.equal(after[0][k], later[k]) for later in after for k in after[0])
    run(tmp_path / "cut", "--max_train_steps", "3", "--save_state")
    run(tmp_path / "cut", "--resume", str(tmp_path / "cut" / "lora-state"))
    resumed = load_file(tmp_path / "cut" / "lora.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)
