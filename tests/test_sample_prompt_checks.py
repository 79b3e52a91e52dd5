"""Sample prompts are checked before step 1 (one line naming file, line or entry, and option), and a sample that
fails during training is one warning: the run goes on and still saves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import train_network
from library.cli import run_cli
from library.engine import SampleRequest
from library.errors import UserError
from library.models.tiny import make_tiny_model
from library.sampling import SampleSettings, check_prompts, load_prompts, make_sample_hook, sample_images
from library.sampling import generate as generate_module
from tests.training import network_args, write_frog_dataset

BIG_SEED = "99999999999999999999999"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _settings(tmp_path: Path, prompts: Path) -> SampleSettings:
    return SampleSettings(prompts_file=prompts, output_dir=tmp_path / "out", training_seed=1)


def _refusal(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_prompts(path)
    return str(info.value)


# ---- checked at start-up ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"a frog --d {BIG_SEED}", f"option --d {BIG_SEED}: a seed must be 0 to 18446744073709551615 (2**64-1)"),
        ("a frog --d 18446744073709551616", "option --d 18446744073709551616: a seed must be 0 to"),
        ("a frog --w 65536 --h 65536", "option --w 65536: a width must be 1 to 4096 pixels, e.g. 512"),
        ("a frog --h 4097", "option --h 4097: a height must be 1 to 4096 pixels"),
        ("a frog --w 0", "option --w 0: a width must be 1 to 4096 pixels"),
        ("a frog --w -64", "option --w '-64' must be a whole number >= 0"),
        ("a frog --l nan", "option --l nan: a guidance scale must be a finite number >= 0, e.g. 7.5"),
        ("a frog --l 1e999", "option --l inf: a guidance scale must be a finite number >= 0"),
        ("a frog --g -inf", "option --g -inf: a guidance scale must be a finite number >= 0"),
        ("a frog --l -2", "option --l -2.0: a guidance scale must be a finite number >= 0"),
        ("a frog --s ５", "option --s '５' must be a whole number >= 0"),
    ],
)
def test_txt_values_out_of_range_are_refused_with_file_line_and_option(tmp_path, line, message):
    path = _write(tmp_path / "p.txt", f"# first\na cat\n{line}\n")
    assert _refusal(path).startswith(f"{path}:3: {message}")


def test_limits_themselves_are_accepted(tmp_path):
    path = _write(tmp_path / "p.txt", "a frog --d 18446744073709551615 --w 4096 --h 1 --l 0 --s 1000\n")
    (prompt,) = check_prompts(_settings(tmp_path, path))
    assert (prompt.seed, prompt.width, prompt.height, prompt.scale, prompt.sample_steps) == (
        2**64 - 1,
        4096,
        64,
        0,
        1000,
    )
    assert torch.Generator().manual_seed(prompt.seed).initial_seed() == 2**64 - 1  # the seed torch takes


def test_txt_steps_are_clamped_as_in_sd_scripts_with_one_warning_each(tmp_path, caplog):
    path = _write(tmp_path / "p.txt", "a frog --s 0\na toad --s 99999 --w 70\n")
    with caplog.at_level(logging.WARNING):
        prompts = check_prompts(_settings(tmp_path, path))
    assert [(p.sample_steps, p.width) for p in prompts] == [(1, 512), (1000, 64)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: option --s 0: sampled with 1 steps (clamped to 1..1000, as sd-scripts)",
        f"{path}:2: option --s 99999: sampled with 1000 steps (clamped to 1..1000, as sd-scripts)",
        f"{path}:2: option --w 70: sampled at 64 (a multiple of 8, at least 64, as sd-scripts)",
    ]


SUBSETS = '[prompt]\nwidth = 640\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nsample_steps = 0\n'
SCALE = "a guidance scale must be a finite number >= 0, e.g. 7.5"
SEED = "a seed must be 0 to 18446744073709551615 (2**64-1), e.g. 42"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "p.toml",
            "[prompt]\nsubset = [1]\n",
            "[[prompt.subset]] #1: must be a table with a 'prompt' key, not int 1; write [[prompt.subset]] tables",
        ),
        (
            "p.toml",
            '[prompt]\nsubset = "a frog"\n',
            "[prompt] subset must be a list of [[prompt.subset]] tables, not str 'a frog'",
        ),
        ("p.toml", "[[prompt]]\nprompt = 1\n", "[[prompt]] #1: key 'prompt' must be str, not 1"),
        ("p.toml", "prompt = [[1, 2]]\n", "[[prompt]] #1: a prompt must be a table/object or a string, not list"),
        ("p.toml", SUBSETS, "[[prompt.subset]] #2: key 'sample_steps' 0: sample steps must be 1 to 1000"),
        (
            "p.toml",
            '[[prompt]]\nprompt = "a"\nsample_steps = 5000\n',
            "[[prompt]] #1: key 'sample_steps' 5000: sample steps must be 1 to 1000",
        ),
        ("p.toml", '[[prompt]]\nprompt = "a"\nseed = -1\n', f"[[prompt]] #1: key 'seed' -1: {SEED}"),
        ("p.toml", '[[prompt]]\nprompt = "a"\nscale = nan\n', f"[[prompt]] #1: key 'scale' nan: {SCALE}"),
        (
            "p.toml",
            '[[prompt]]\nprompt = "a"\nheight = 65536\n',
            "[[prompt]] #1: key 'height' 65536: a height must be 1 to 4096 pixels, e.g. 512",
        ),
        ("p.json", '[{"prompt": "a", "scale": NaN}]', f"item #1: key 'scale' nan: {SCALE}"),
        ("p.json", f'["a", {{"prompt": "b", "seed": {BIG_SEED}}}]', f"item #2: key 'seed' {BIG_SEED}: {SEED}"),
        (
            "p.json",
            '[{"prompt": "a", "width": 0}]',
            "item #1: key 'width' 0: a width must be 1 to 4096 pixels, e.g. 512",
        ),
        ("p.json", '["a --l nan"]', f"item #1: option --l nan: {SCALE}"),
    ],
)
def test_toml_and_json_shapes_and_values_are_refused_naming_the_entry(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    assert _refusal(path) == f"{path}: {message}"


def test_echoed_values_are_one_short_line(tmp_path):
    """A value repeated in a message is cut to 80 characters and never carries a raw newline."""
    long_text = "x" * 500
    cases = {  # file name: (text, the unit repeated in the bad value, as the message would echo it)
        "a.txt": (f"a frog --w {long_text}\n", "x"),
        "b.txt": (f"a frog --ss {long_text}\n", "x"),
        "c.toml": ('[prompt]\nsubset = ["' + "line\\n" * 100 + '"]\n', "line\\n"),
        "d.toml": ('[[prompt]]\nprompt = "a"\nwidth = """' + "w\n" * 100 + '"""\n', "w\\n"),
        "e.json": ('[{"prompt": "a", "' + "k" * 500 + '": 1}]', "k"),
    }
    for name, (text, unit) in cases.items():
        message = _refusal(_write(tmp_path / name, text))
        assert "\n" not in message and "..." in message, (name, message)
        assert unit * ((80 - 6) // len(unit) - 1) in message and unit * (80 // len(unit) + 1) not in message, (
            name,
            message,
        )


def test_the_hook_checks_every_value_when_made(tmp_path):
    path = _write(tmp_path / "p.txt", "a cat\na frog --l nan\n")
    with pytest.raises(UserError, match=r"p\.txt:2: option --l nan: a guidance scale must be a finite number"):
        make_sample_hook(_settings(tmp_path, path))


def test_a_bad_prompt_file_stops_train_network_before_step_1(tmp_path, capsys):
    data = write_frog_dataset(tmp_path / "data", count=2)
    prompts = _write(tmp_path / "p.txt", f"a frog --d {BIG_SEED}\n")
    out = tmp_path / "out"
    argv = network_args("tiny-sd1", data, out, "--max_train_steps", "1", "--sample_prompts", str(prompts))
    assert run_cli(train_network.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {prompts}:1: option --d {BIG_SEED}: {SEED}"]
    assert not out.exists() or not any(out.rglob("*.safetensors"))  # stopped before training


# ---- a failing sample never loses the run -----------------------------------------------------------------------


def _fail_on(index: int, error: BaseException):
    original = generate_module.generate_image

    def generate(components, request, *args, **kwargs):
        if request.index == index:
            raise error
        return original(components, request, *args, **kwargs)

    return generate


def test_one_failing_prompt_is_one_warning_and_the_others_are_made(tmp_path, monkeypatch, caplog):
    model = make_tiny_model()
    path = _write(tmp_path / "p.txt", "a cat --s 1 --w 64 --h 64\na dog --s 1 --w 64 --h 64 --d 4\n")
    oom = RuntimeError("CUDA out of memory. Tried to allocate 64 GiB\nsee the documentation for memory management")
    monkeypatch.setattr(generate_module, "generate_image", _fail_on(0, oom))
    with caplog.at_level(logging.WARNING):
        samples = sample_images(model, _settings(tmp_path, path), epoch=None, step=3)
    assert [s.prompt.index for s in samples] == [1] and samples[0].path.is_file()
    assert [r.getMessage() for r in caplog.records] == [
        "sample 0 at step 3 failed: RuntimeError: CUDA out of memory. Tried to allocate 64 GiB; no image for it, "
        "training continues"
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "sample").iterdir()) == [samples[0].path.name]
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        sample_images(model, _settings(tmp_path, path), epoch=None, step=3, keep_going=False)


def test_interrupts_are_never_swallowed(tmp_path, monkeypatch):
    model = make_tiny_model()
    hook = make_sample_hook(_settings(tmp_path, _write(tmp_path / "p.txt", "a cat --s 1 --w 64 --h 64\n")))
    request = SampleRequest(components=model, step=1, epoch=None, output_dir=tmp_path, device=torch.device("cpu"))
    for interrupt in (KeyboardInterrupt(), SystemExit(3)):
        monkeypatch.setattr(generate_module, "generate_image", _fail_on(0, interrupt))
        with pytest.raises(type(interrupt)):
            hook(request)


def test_a_prompt_file_broken_mid_run_skips_that_round_with_one_warning(tmp_path, caplog):
    """No mock: the file passes the start-up check, then is edited to a bad value before the hook runs."""
    path = _write(tmp_path / "p.txt", "a cat --s 1 --w 64 --h 64\n")
    hook = make_sample_hook(_settings(tmp_path, path))
    _write(path, "a cat --s 1 --w 64 --h 99999\n")
    request = SampleRequest(
        components=make_tiny_model(), step=5, epoch=None, output_dir=tmp_path, device=torch.device("cpu")
    )
    with caplog.at_level(logging.WARNING):
        assert hook(request) == []
    error = f"UserError: {path}:1: option --h 99999: a height must be 1 to 4096 pixels, e.g. 512"
    assert len(error) <= 200  # else the warning would cut it
    assert [r.getMessage() for r in caplog.records] == [f"sample images at step 5 skipped: {error}; training continues"]


def test_a_run_whose_samples_fail_still_trains_and_saves(tmp_path, monkeypatch, capsys):
    data = write_frog_dataset(tmp_path / "data", count=2)
    prompts = _write(tmp_path / "p.txt", "a frog --s 1 --w 64 --h 64 --d 1\n")
    out = tmp_path / "out"
    monkeypatch.setattr(generate_module, "generate_image", _fail_on(0, ValueError("sampler exploded\nsecond line")))
    argv = network_args(
        "tiny-sd1",
        data,
        out,
        "--max_train_steps",
        "2",
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_steps",
        "2",
        "--save_every_n_steps",
        "2",
        "--save_state",
    )
    assert run_cli(train_network.main, argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "sample" in line and "failed" in line] == [
        "sample 0 at step 2 failed: ValueError: sampler exploded; no image for it, training continues"
    ]
    assert not any(line.startswith("error:") or "Traceback" in line for line in err)
    saved = sorted(p.name for p in out.iterdir())
    assert "lora.safetensors" in saved and "lora-step00000002.safetensors" in saved, saved
    assert "lora-step00000002-state" in saved, saved
