"""Sample images during training: prompt files, samplers, seeds, RNG isolation, file names, trackers, cadence."""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.settings import settings_from_flags
from library.errors import UserError
from library.models.sd import SD1
from library.models.tiny import make_tiny_model
from library.sampling import (
    SAMPLER_NAMES,
    SampleFlags,
    SamplePrompt,
    SampleSettings,
    add_sample_arguments,
    check_prompts,
    generate_image,
    load_prompts,
    log_images_to_trackers,
    make_sample_hook,
    make_sampler,
    preserved_rng,
    resolve_prompt,
    sample_file_name,
    sample_images,
    should_sample,
)

STAMP = "20240102030405"
SD_SCHEDULE = SD1.noise_scheduler(False).config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


def _settings(tmp_path: Path, prompts_file: Path, **kwargs) -> SampleSettings:
    return SampleSettings(prompts_file=prompts_file, output_dir=tmp_path / "out", **kwargs)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _request(**kwargs) -> SamplePrompt:
    defaults = dict(index=0, prompt="a dog", width=64, height=64, sample_steps=2, scale=7.5, sampler="ddim")
    return SamplePrompt(**{**defaults, **kwargs})


# ---- prompt files -----------------------------------------------------------------------------------------------


def test_txt_prompts_parse_like_sd_scripts(tmp_path):
    path = _write(
        tmp_path / "p.txt",
        "# a comment line\n"
        "\n"
        "masterpiece, a cat --n lowres, blurry --w 768 --h 640 --d 42 --l 5.5 --s 20 --ss euler_a\n"
        "   \n"
        "  # an indented comment\n"
        "a dog --S 2000 --W 100\n"
        "plain prompt\n",
    )
    assert load_prompts(path) == [
        {
            "prompt": "masterpiece, a cat",
            "negative_prompt": "lowres, blurry",
            "width": 768,
            "height": 640,
            "seed": 42,
            "scale": 5.5,
            "sample_steps": 20,
            "sample_sampler": "euler_a",
            "enum": 0,
        },
        {"prompt": "a dog", "sample_steps": 1000, "width": 100, "enum": 1},  # steps clamped to 1..1000
        {"prompt": "plain prompt", "enum": 2},
    ]


def test_txt_unknown_option_is_ignored_as_in_sd_scripts(tmp_path):
    path = _write(tmp_path / "p.txt", "a dog --am 0.5 --d 7\n")
    assert load_prompts(path) == [{"prompt": "a dog", "seed": 7, "enum": 0}]


def test_toml_prompts_both_layouts(tmp_path):
    subsets = _write(
        tmp_path / "a.toml",
        """
[prompt]
width = 640
sample_steps = 12
scale = 6

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
negative_prompt = "ugly"
width = 512
sample_sampler = "dpm++_2m_karras"
""",
    )
    assert load_prompts(subsets) == [
        {"prompt": "a cat", "width": 640, "sample_steps": 12, "scale": 6, "seed": 1, "enum": 0},
        {
            "prompt": "a dog",
            "negative_prompt": "ugly",
            "width": 512,
            "sample_steps": 12,
            "scale": 6,
            "sample_sampler": "dpm++_2m_karras",
            "enum": 1,
        },
    ]
    tables = _write(
        tmp_path / "b.toml",
        '[[prompt]]\nprompt = "one"\nheight = 320\n\n'
        '[[prompt]]\nprompt = "two"\nscale = 3.5\nsample_sampler = "heun"\n',
    )
    assert load_prompts(tables) == [
        {"prompt": "one", "height": 320, "enum": 0},
        {"prompt": "two", "scale": 3.5, "sample_sampler": "heun", "enum": 1},
    ]


def test_json_prompts_objects_and_lines(tmp_path):
    path = _write(
        tmp_path / "p.json",
        '[{"prompt": "a cat", "seed": 3, "width": 256, "sample_steps": 4},\n "a dog --n bad --l 2"]',
    )
    assert load_prompts(path) == [
        {"prompt": "a cat", "seed": 3, "width": 256, "sample_steps": 4, "enum": 0},
        {"prompt": "a dog", "negative_prompt": "bad", "scale": 2.0, "enum": 1},
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.txt", "ok\n# c\na dog --w wide\n", r"bad\.txt:3: option --w 'wide' must be a whole number"),
        ("bad.txt", "a dog --l\n", r"bad\.txt:1: option --l has no value"),
        (
            "bad.txt",
            "\na dog --ss euler_b\n",
            r"bad\.txt:2: option --ss: unknown sampler 'euler_b'; valid samplers: ddim",
        ),
        ("bad.toml", '[[prompt]]\nprompt = "x"\nwidth = \n', r"bad\.toml:3: invalid TOML"),
        ("bad.toml", '[[prompt]]\nprompt = "x"\nsteps = 3\n', r"bad\.toml: \[\[prompt\]\] #1: unknown key 'steps'"),
        ("bad.toml", '[[prompt]]\nprompt = "x"\nwidth = "512"\n', r"key 'width' must be int, not '512'"),
        ("bad.toml", "[[prompt]]\nseed = 3\n", r"bad\.toml: \[\[prompt\]\] #1: missing key 'prompt'"),
        ("bad.toml", 'title = "x"\n', r"bad\.toml: no prompts found"),
        ("bad.json", '[\n{"prompt": "x"},\n{"prompt": }\n]', r"bad\.json:3: invalid JSON"),
        ("bad.json", '{"prompt": "x"}', r"bad\.json: must hold a JSON list"),
        ("bad.json", '[{"prompt": "x"}, 5]', r"bad\.json: item #2: a prompt must be"),
        ("bad.yaml", "prompt: x\n", r"unsupported file type"),
    ],
)
def test_malformed_prompt_files_name_file_and_place(tmp_path, name, text, expected):
    with pytest.raises(UserError, match=expected):
        load_prompts(_write(tmp_path / name, text))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match=r"--sample_prompts .*nope\.txt: file not found"):
        load_prompts(tmp_path / "nope.txt")


def test_check_prompts_resolves_everything_up_front(tmp_path):
    path = _write(tmp_path / "p.txt", "a cat --w 70\na dog --ss heun --s 0\n")
    resolved = check_prompts(_settings(tmp_path, path, default_sampler="euler"))
    assert [(p.index, p.width, p.sampler, p.sample_steps) for p in resolved] == [
        (0, 64, "euler", 30),
        (1, 512, "heun", 1),
    ]
    with pytest.raises(UserError, match="unknown sampler 'k_heun'"):
        check_prompts(_settings(tmp_path, path, default_sampler="k_heun"))


def test_the_engine_hook_checks_its_prompt_file_when_made(tmp_path):
    bad = _write(tmp_path / "p.txt", "a cat\na dog --w wide\n")
    with pytest.raises(UserError, match=r"p\.txt:2: option --w 'wide' must be a whole number"):
        make_sample_hook(_settings(tmp_path, bad))
    with pytest.raises(UserError, match=r"--sample_prompts .*nope\.txt: file not found"):
        make_sample_hook(_settings(tmp_path, tmp_path / "nope.txt"))
    assert callable(make_sample_hook(_settings(tmp_path, _write(tmp_path / "ok.txt", "a cat\n"))))


def test_resolve_prompt_defaults_and_rounding():
    assert resolve_prompt({"prompt": "x", "enum": 4}) == SamplePrompt(
        index=4,
        prompt="x",
        negative_prompt=None,
        width=512,
        height=512,
        sample_steps=30,
        scale=7.5,
        seed=None,
        sampler="ddim",
    )
    resolved = resolve_prompt({"prompt": "x", "width": 100, "height": 30, "guidance_scale": 3.0, "enum": 0}, "heun")
    assert (resolved.width, resolved.height, resolved.scale, resolved.sampler) == (96, 64, 3.0, "heun")
    assert resolve_prompt({"prompt": "x", "scale": 2, "guidance_scale": 9.0, "enum": 0}).scale == 2.0


# ---- samplers ---------------------------------------------------------------------------------------------------


def test_sampler_table_matches_sd_scripts():
    expected = {
        "ddim": "DDIMScheduler",
        "pndm": "PNDMScheduler",
        "lms": "LMSDiscreteScheduler",
        "k_lms": "LMSDiscreteScheduler",
        "euler": "EulerDiscreteScheduler",
        "k_euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "k_euler_a": "EulerAncestralDiscreteScheduler",
        "heun": "HeunDiscreteScheduler",
        "dpm_2": "KDPM2DiscreteScheduler",
        "k_dpm_2": "KDPM2DiscreteScheduler",
        "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
        "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
        "dpmsolver": "DPMSolverMultistepScheduler",
        "dpmsolver++": "DPMSolverMultistepScheduler",
        "dpmsingle": "DPMSolverSinglestepScheduler",
        "dpm++_2m_karras": "DPMSolverMultistepScheduler",
        "dpm++_2m_sde_karras": "DPMSolverMultistepScheduler",
    }
    assert set(SAMPLER_NAMES) == set(expected)
    for name, class_name in expected.items():
        scheduler = make_sampler(name, SD_SCHEDULE, "v_prediction")
        config = scheduler.config
        assert type(scheduler).__name__ == class_name, name
        assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
            1000,
            0.00085,
            0.012,
            "scaled_linear",
        )
        assert config.prediction_type == "v_prediction"
        if "clip_sample" in config:  # the model's setting (off for SD), where sd-scripts forces it on
            assert config.clip_sample is False
    assert make_sampler("ddim", {**SD_SCHEDULE, "clip_sample": True}).config.clip_sample is True
    ddim = make_sampler("ddim", SD_SCHEDULE).config
    assert ddim.steps_offset == 0 and ddim.prediction_type == "epsilon"
    assert make_sampler("dpmsolver", SD_SCHEDULE).config.algorithm_type == "dpmsolver"
    assert make_sampler("dpmsolver++", SD_SCHEDULE).config.algorithm_type == "dpmsolver++"
    assert not make_sampler("dpmsolver++", SD_SCHEDULE).config.use_karras_sigmas
    karras = make_sampler("dpm++_2m_karras", SD_SCHEDULE).config
    assert (karras.algorithm_type, karras.use_karras_sigmas, karras.solver_order) == ("dpmsolver++", True, 2)
    sde = make_sampler("dpm++_2m_sde_karras", SD_SCHEDULE).config
    assert (sde.algorithm_type, sde.use_karras_sigmas, sde.solver_order) == ("sde-dpmsolver++", True, 2)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UserError) as info:
        make_sampler("euler_ancestral", SD_SCHEDULE)
    message = str(info.value)
    assert message.startswith("--sample_sampler: unknown sampler 'euler_ancestral'; valid samplers: ddim, pndm")
    assert all(name in message for name in SAMPLER_NAMES)
    with pytest.raises(UserError, match="unknown sampler 'nope'"):
        resolve_prompt({"prompt": "x", "enum": 0}, default_sampler="nope")


def _diffusers_pixels(components, request: SamplePrompt, seed: int) -> np.ndarray:
    """The same request through diffusers' own StableDiffusionPipeline (our prompt embeddings, a fresh sampler)."""
    from library.text.encode import encode_prompts

    pipe = components.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_sampler(
        request.sampler, components.scheduler.config, components.prediction_type, steps=request.sample_steps
    )
    with torch.no_grad():
        texts = [request.prompt, request.negative_prompt or ""]
        embeddings = encode_prompts(
            components.text_encoder, components.tokenizer, texts, weighted=True, v2=components.family.v2
        )
    return _pixels(
        pipe(
            prompt_embeds=embeddings[:1],
            negative_prompt_embeds=embeddings[1:],
            width=request.width,
            height=request.height,
            num_inference_steps=request.sample_steps,
            guidance_scale=request.scale,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    )


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_matches_the_diffusers_pipeline(model, tmp_path, sampler):
    """Same embeddings, scheduler and seed through diffusers' StableDiffusionPipeline give the same pixels, at the
    requested (non-square) size."""
    request = _request(
        prompt="a red dog", negative_prompt="blurry", width=72, sample_steps=3, scale=6.0, sampler=sampler
    )
    image = generate_image(model, request, _settings(tmp_path, tmp_path / "x.txt"), seed=21)
    assert image.size == (72, 64) and image.mode == "RGB"
    mine = _pixels(image)
    assert np.array_equal(mine, _diffusers_pixels(model, request, 21))
    assert mine.std() > 5  # a real picture, not a flat (NaN or saturated) one


def test_v_prediction_model_matches_the_diffusers_pipeline(tmp_path):
    sd2 = make_tiny_model(v2=True)
    request = _request(sampler="euler", negative_prompt="ugly", sample_steps=3)
    settings = _settings(tmp_path, tmp_path / "x.txt")
    mine = _pixels(generate_image(sd2, request, settings, seed=1))
    assert np.array_equal(mine, _diffusers_pixels(sd2, request, 1))
    as_epsilon = _pixels(generate_image(replace(sd2, v_parameterization=False), request, settings, seed=1))
    assert np.abs(mine - as_epsilon).max() > 0  # the prediction type reaches the sampler


# ---- seeds, weights, isolation ----------------------------------------------------------------------------------


def test_seeded_sample_is_pinned_and_every_input_changes_it(model, tmp_path):
    """A seeded euler_a sample on the tiny model (seed 11) reproduces exactly; its mean and corner pixels are pinned
    (to within 1 level, so float summation order on another CPU cannot fail it); and the prompt, negative prompt,
    seed, guidance scale, step count and sampler each change the picture."""
    settings = _settings(tmp_path, tmp_path / "x.txt")
    base = _request(prompt="a dog", negative_prompt="blurry", sampler="euler_a")
    first = _pixels(generate_image(model, base, settings, seed=11))
    assert np.array_equal(first, _pixels(generate_image(model, base, settings, seed=11)))
    assert first.mean() == pytest.approx(116.575, abs=0.05)
    corners = np.stack([first[0, 0], first[0, 1], first[63, 63]])
    assert np.abs(corners - np.array([[141, 124, 145], [136, 136, 153], [147, 126, 142]])).max() <= 1
    variants = {
        "prompt": (replace(base, prompt="a cat"), 11),
        "negative prompt": (replace(base, negative_prompt="sharp"), 11),
        "seed": (base, 12),
        "scale": (replace(base, scale=3.0), 11),
        "steps": (replace(base, sample_steps=3), 11),
        "sampler": (replace(base, sampler="euler"), 11),
    }
    for what, (request, seed) in variants.items():
        other = _pixels(generate_image(model, request, settings, seed=seed))
        assert np.abs(first - other).max() > 0, what


def test_weighted_prompt_changes_the_image(model, tmp_path):
    settings = _settings(tmp_path, tmp_path / "x.txt")
    plain = _pixels(generate_image(model, _request(prompt="dog"), settings, seed=3))
    neutral = _pixels(generate_image(model, _request(prompt="(dog:1.0)"), settings, seed=3))
    heavy = _pixels(generate_image(model, _request(prompt="(dog:1.5)"), settings, seed=3))
    assert np.array_equal(plain, neutral)  # the weight syntax is read, not fed to CLIP as text
    assert np.abs(plain - heavy).max() > 0


def _global_draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_preserved_rng_restores_every_global_generator():
    _seed_all(1)
    expected = _global_draws()
    _seed_all(1)
    with preserved_rng():
        _global_draws()
        _global_draws()
    assert _global_draws() == expected


def test_sampling_leaves_global_rng_and_train_flags_alone(model, tmp_path):
    prompts = _write(tmp_path / "p.txt", "a cat --s 2 --w 64 --h 64 --ss euler_a\na dog --s 2 --w 64 --h 64 --d 9\n")
    settings = _settings(tmp_path, prompts, training_seed=123)
    _seed_all(0)
    expected = _global_draws()

    model.unet.train()
    model.unet.conv_in.eval()
    model.text_encoder.train()
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    _seed_all(0)
    try:
        samples = sample_images(model, settings, epoch=None, step=1)
    finally:
        hook.remove()
    assert len(samples) == 2 and seen and not any(seen)  # the UNet ran in eval mode
    assert _global_draws() == expected
    assert model.unet.training and not model.unet.conv_in.training and model.unet.conv_out.training
    assert model.text_encoder.training and not model.vae.training
    model.unet.eval()
    model.text_encoder.eval()


def test_unseeded_prompts_follow_the_training_seed(model, tmp_path):
    prompts = _write(tmp_path / "p.txt", "a cat --s 2 --w 64 --h 64\n")
    settings = _settings(tmp_path, prompts, training_seed=7)
    first = sample_images(model, settings, epoch=None, step=10)[0]
    again = sample_images(model, settings, epoch=None, step=10)[0]
    later = sample_images(model, settings, epoch=None, step=20)[0]
    assert first.seed == again.seed and np.array_equal(_pixels(first.image), _pixels(again.image))
    assert later.seed != first.seed


# ---- files ------------------------------------------------------------------------------------------------------


def test_file_names_are_sd_scripts_names():
    assert sample_file_name("run", None, 12, 0, STAMP, 42) == f"run_000012_00_{STAMP}_42.png"
    assert sample_file_name("run", 3, 12, 5, STAMP, None) == f"run_e000003_05_{STAMP}.png"
    assert sample_file_name(None, 0, 0, 1, STAMP, None) == f"e000000_01_{STAMP}.png"
    assert sample_file_name(None, None, 1234567, 11, STAMP, 0) == f"1234567_11_{STAMP}_0.png"


def test_sample_images_writes_named_pngs(model, tmp_path):
    prompts = _write(tmp_path / "p.txt", "a cat --s 2 --w 64 --h 64 --d 42\n# skip\na TOKEN dog --s 2 --w 80 --h 64\n")
    settings = _settings(tmp_path, prompts, output_name="run", training_seed=1)
    samples = sample_images(
        model, settings, epoch=2, step=40, timestamp=lambda: STAMP, prompt_replacement=("TOKEN", "tok1 tok2")
    )
    sample_dir = tmp_path / "out" / "sample"
    assert [s.path for s in samples] == [
        sample_dir / f"run_e000002_00_{STAMP}_42.png",
        sample_dir / f"run_e000002_01_{STAMP}.png",
    ]
    assert sorted(p.name for p in sample_dir.iterdir()) == sorted(s.path.name for s in samples)  # no temp files left
    assert samples[1].prompt.prompt == "a tok1 tok2 dog"
    assert (samples[0].seed, samples[0].prompt.seed) == (42, 42)
    for sample in samples:
        with Image.open(sample.path) as written:
            assert written.format == "PNG"
            assert np.array_equal(_pixels(written), _pixels(sample.image))
    assert samples[1].image.size == (80, 64)


def test_processes_split_prompts_like_sd_scripts(model, tmp_path):
    prompts = _write(tmp_path / "p.txt", "".join(f"p{i} --s 1 --w 64 --h 64 --l 1\n" for i in range(5)))
    settings = _settings(tmp_path, prompts)
    mine = sample_images(model, settings, epoch=None, step=3, process_index=1, num_processes=2)
    assert [s.prompt.index for s in mine] == [1, 3]


# ---- cadence, flags, trackers -----------------------------------------------------------------------------------


def test_should_sample_matches_sd_scripts():
    def due(step, epoch, end, steps=None, epochs=None, first=False):
        return should_sample(step, epoch, every_n_steps=steps, every_n_epochs=epochs, at_first=first, is_epoch_end=end)

    assert due(0, 0, False, steps=1, first=True) and not due(0, 0, False, steps=1)
    assert not due(5, None, False)  # nothing configured
    assert due(10, None, False, steps=5) and not due(11, None, False, steps=5)
    assert not due(10, 2, True, steps=5)  # step cadence is not checked at epoch ends
    assert due(10, 2, True, epochs=2) and not due(10, 3, True, epochs=2)
    assert not due(10, None, False, steps=5, epochs=2)  # epochs take precedence: steps are ignored
    assert due(7, 4, True, steps=5, epochs=2)


def test_sample_flags():
    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    args = parser.parse_args([])
    assert (args.sample_prompts, args.sample_sampler, args.sample_at_first) == (None, "ddim", False)
    assert (args.sample_every_n_steps, args.sample_every_n_epochs) == (None, None)
    args = parser.parse_args(
        ["--sample_prompts", "p.txt", "--sample_sampler", "dpm++_2m_sde_karras", "--sample_at_first"]
    )
    flags = argparse.Namespace(**vars(args), output_dir="o", seed=5, output_name="n")
    settings = settings_from_flags(SampleFlags, flags).settings()
    assert settings == SampleSettings(
        prompts_file=Path("p.txt"),
        output_dir=Path("o"),
        output_name="n",
        default_sampler="dpm++_2m_sde_karras",
        training_seed=5,
        at_first=True,
    )
    assert settings_from_flags(SampleFlags, parser.parse_args([])).settings() is None
    for bad in (["--sample_sampler", "euler_b"], ["--sample_every_n_steps", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def _release(accelerator) -> None:
    """End trackers and forget accelerate's process-wide state, so later tests may pick another precision."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def test_images_reach_tensorboard(tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    try:
        accelerator.init_trackers("run")
        images = [Image.new("RGB", (72, 64), (255, 0, 0)), Image.new("RGB", (72, 64), (0, 0, 255))]
        log_images_to_trackers(accelerator, images, ["a red", "a blue"], step=7)
    finally:
        _release(accelerator)

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["sample_0", "sample_1"]
    logged = events.Images("sample_1")[0]
    assert (logged.step, logged.width, logged.height) == (7, 72, 64)
    decoded = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"))
    assert tuple(decoded[0, 0]) == (0, 0, 255)


def test_engine_hook_samples_into_the_request_output_dir(model, tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.engine import SampleRequest

    prompts = _write(tmp_path / "p.txt", "a cat --s 1 --w 64 --h 64 --d 5\n")
    settings = SampleSettings(prompts_file=prompts, output_dir=tmp_path / "ignored", output_name="n")
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    try:
        accelerator.init_trackers("run")
        hook = make_sample_hook(settings, accelerator)
        request = SampleRequest(
            components=model, step=0, epoch=0, output_dir=tmp_path / "out", device=torch.device("cpu")
        )
        samples = hook(request)
    finally:
        _release(accelerator)
    assert samples[0].path.parent == tmp_path / "out" / "sample"
    assert samples[0].path.name.startswith("n_e000000_00_") and samples[0].path.name.endswith("_5.png")
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert events.Tags()["images"] == ["sample_0"]
