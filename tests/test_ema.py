"""--ema: the average follows a hand-computed sequence (with the (1+t)/(10+t) warm-up and --ema_update_every), is
what train_network.py saves and samples, leaves training itself unchanged, and resumes step-exactly from a state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_network
from library.engine.ema import EMA_FILE, EmaSettings, EmaWeights, ema_decay
from library.errors import UserError
from tests.training import network_args, write_frog_dataset


def hand_ema(start: list[float], weights: list[list[float]], decay: float, every: int) -> list[float]:
    """The EMA after each step's ``weights``, written out from the formula in float64."""
    ema = list(start)
    for step, values in enumerate(weights, start=1):
        if step % every:
            continue
        keep = min(decay, (1 + (step - 1)) / (10 + (step - 1)))
        ema = [keep * e + (1 - keep) * w for e, w in zip(ema, values)]
    return ema


def test_decay_warms_up_then_holds():
    assert [ema_decay(0.5, s) for s in (1, 2, 3, 9, 10, 100)] == pytest.approx(
        [1 / 10, 2 / 11, 3 / 12, 9 / 18, 0.5, 0.5]
    )
    assert ema_decay(0.999, 1000) == pytest.approx(1000 / 1009)
    assert ema_decay(0.999, 10_000) == 0.999


@pytest.mark.parametrize("every", [1, 3])
def test_average_follows_the_hand_computed_sequence(every):
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ema = EmaWeights([param], EmaSettings(ema=True, ema_decay=0.6, ema_update_every=every))
    trajectory = [[1.5, -1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 3.0, 2.0], [4.0, -4.0, 0.25], [1.0, 1.0, 1.0]] * 3
    for step, values in enumerate(trajectory, start=1):
        with torch.no_grad():
            param.copy_(torch.tensor(values))
        ema.update(step)
        expected = hand_ema([1.0, -2.0, 0.5], trajectory[:step], 0.6, every)
        assert ema.shadow[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_applied_swaps_in_the_average_and_restores_the_raw_weights_exactly():
    param = torch.nn.Parameter(torch.randn(5, dtype=torch.float16))
    ema = EmaWeights([param], EmaSettings(ema=True, ema_device="cpu"))
    raw = param.detach().clone()
    ema.shadow[0].fill_(0.25)
    with ema.applied():
        assert torch.equal(param.detach(), torch.full((5,), 0.25, dtype=torch.float16))
    assert torch.equal(param.detach(), raw)
    assert ema.shadow[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (EmaSettings(ema=True, ema_decay=1.0), "--ema_decay 1.0: must be between 0 and 1"),
        (EmaSettings(ema=True, ema_update_every=0), "--ema_update_every 0: must be 1 or more"),
        (EmaSettings(ema=True, ema_device="gpu"), "--ema_device gpu: must be one of same, cpu"),
        (EmaSettings(sample_without_ema=True), "--sample_without_ema needs --ema"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=f"^{message}"):
        settings.check()


@pytest.fixture(scope="module")
def start(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A frog dataset and a LoRA file to start every run from (so the weights before step 1 are known)."""
    root = tmp_path_factory.mktemp("ema")
    data = write_frog_dataset(root / "data")
    train_network.main(network_args(model_dir, data, root / "init", "--max_train_steps", "1"))
    return data, root / "init" / "lora.safetensors"


def ema_run(model_dir: Path, start: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    data, init = start
    return network_args(model_dir, data, out, "--network_weights", str(init), "--network_dropout", "0.1", *extra)


def test_train_network_saves_the_average_of_the_raw_weights(model_dir, start, tmp_path):
    """The --ema run's file equals the EMA computed by hand from a plain run's per-step files; the raw weights in
    its state equal the plain run's (EMA never changes training)."""
    steps = ["--max_train_steps", "3"]
    train_network.main(ema_run(model_dir, start, tmp_path / "raw", *steps, "--save_every_n_steps", "1"))
    ema_args = ["--ema", "--ema_decay", "0.7", "--ema_device", "cpu", "--save_state"]
    train_network.main(ema_run(model_dir, start, tmp_path / "ema", *steps, *ema_args))
    initial = load_file(start[1])
    raw = [load_file(tmp_path / "raw" / f"lora-step{s:08d}.safetensors") for s in (1, 2)]
    raw.append(load_file(tmp_path / "raw" / "lora.safetensors"))
    saved = load_file(tmp_path / "ema" / "lora.safetensors")
    assert saved.keys() == initial.keys()
    moved = 0
    for key, value in saved.items():
        expected = initial[key].double()
        for step, weights in enumerate(raw, start=1):
            keep = min(0.7, step / (9 + step))
            expected = keep * expected + (1 - keep) * weights[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6)
        moved += not torch.equal(value, raw[-1][key])
    assert moved > len(saved) // 2  # the file is the average, not the last raw weights
    state = tmp_path / "ema" / "lora-state"
    assert (state / EMA_FILE).is_file()
    raw_in_state = load_file(state / "model.safetensors")
    assert raw_in_state.keys() == raw[-1].keys()
    assert all(torch.equal(raw_in_state[k], raw[-1][k]) for k in raw_in_state)
    trained = [k for k in raw_in_state if not k.endswith(".alpha")]
    assert len(load_file(state / EMA_FILE)) == len(trained)


def test_resume_restores_the_average_step_exactly(model_dir, start, tmp_path):
    ema_args = ["--ema", "--ema_decay", "0.8", "--ema_update_every", "2"]
    train_network.main(ema_run(model_dir, start, tmp_path / "straight", "--max_train_steps", "5", *ema_args))
    first = ema_run(model_dir, start, tmp_path / "cut", "--max_train_steps", "3", "--save_state", *ema_args)
    train_network.main(first)
    state = tmp_path / "cut" / "lora-state"
    train_network.main(
        ema_run(model_dir, start, tmp_path / "cut", "--max_train_steps", "5", "--resume", str(state), *ema_args)
    )
    straight = load_file(tmp_path / "straight" / "lora.safetensors")
    resumed = load_file(tmp_path / "cut" / "lora.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # without the state's average the resumed run restarts it from the step-3 weights: a different file
    averages = load_file(state / EMA_FILE)
    save_file({k: torch.zeros_like(v) for k, v in averages.items()}, state / EMA_FILE)
    train_network.main(
        ema_run(model_dir, start, tmp_path / "cut", "--max_train_steps", "5", "--resume", str(state), *ema_args)
    )
    assert not all(torch.equal(straight[k], v) for k, v in load_file(tmp_path / "cut" / "lora.safetensors").items())


def test_sample_without_ema_also_samples_the_raw_weights(model_dir, start, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a frog --w 64 --h 64 --s 2 --d 5\n")
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--ema", "--sample_without_ema", "--sample_prompts", str(prompts)]
    train_network.main(ema_run(model_dir, start, out, *extra, "--sample_every_n_steps", "2"))
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 2 and names[1].endswith("_5_noema.png") and names[0].endswith("_5.png")
    assert names[0].startswith("lora_000002_00_") and names[1].startswith("lora_000002_00_")


def test_train_db_saves_the_average_of_the_whole_model(model_dir, tmp_path):
    """A full-weight recipe: after one step the saved UNet is 0.1 * base + 0.9 * trained (warm-up decay 1/10)."""
    import train_db
    from tests.images import write_image
    from tests.test_train_db import db_args
    from tests.training import model_weights

    for i in range(2):
        write_image(tmp_path / "img" / "2_sks dog" / f"a{i}.png", seed=i)
    common = ["--train_data_dir", str(tmp_path / "img"), "--max_train_steps", "1", "--save_model_as", "diffusers"]
    train_db.main(db_args(model_dir, tmp_path / "raw", *common))
    train_db.main(db_args(model_dir, tmp_path / "ema", *common, "--ema"))
    base, raw = model_weights(model_dir)["unet"], model_weights(tmp_path / "raw" / "db")["unet"]
    averaged = model_weights(tmp_path / "ema" / "db")["unet"]
    changed = [k for k in base if not torch.equal(base[k], raw[k])]
    assert len(changed) > len(base) // 2
    for key in base:
        expected = 0.1 * base[key].double() + 0.9 * raw[key].double()
        torch.testing.assert_close(averaged[key].double(), expected, rtol=0, atol=1e-6)


def test_textual_inversion_refuses_a_unet_window(tmp_path, capsys):
    import train_textual_inversion
    from library.cli import run_cli
    from tests.test_textual_inversion import TOKEN, argv
    from tests.training import write_captioned_images

    data = write_captioned_images(tmp_path / "data" / "1_x", [f"a {TOKEN}"])
    args = argv(data.parent, tmp_path / "out", "--max_train_steps", "1", "--unet_train_until", "1", "--ema")
    assert run_cli(train_textual_inversion.main, args) == 2
    assert capsys.readouterr().err.endswith("--unet_train_until: this run trains no unet weights; drop the flag\n")
