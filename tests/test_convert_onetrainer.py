"""tools/convert_onetrainer_config.py on OneTrainer's shipped SD1.5 presets and an SDXL fine-tune config."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import toml

import sdxl_train
import sdxl_train_network
import train_db
import train_network
import train_textual_inversion
from library.cli import run_cli
from library.config.config_file import read_config_file
from library.config.dataset_schema import validate_user_config
from library.errors import UserError
from library.onetrainer.config import load_onetrainer_config
from library.onetrainer.mapping import Conversion
from library.onetrainer.translate import convert as translate
from library.sampling.prompts import load_prompts
from tools.convert_onetrainer_config import main

DATA = Path(__file__).parent / "data" / "onetrainer"
PARSERS = {
    "train_network.py": train_network.setup_parser,
    "train_db.py": train_db.setup_parser,
    "train_textual_inversion.py": train_textual_inversion.setup_parser,
    "sdxl_train.py": sdxl_train.setup_parser,
    "sdxl_train_network.py": sdxl_train_network.setup_parser,
}
PRESETS = {
    "#sd 1.5 LoRA": "train_network.py",
    "#sd 1.5 embedding": "train_textual_inversion.py",
    "#sd 1.5 inpaint masked": "train_db.py",
    "#sd 1.5 inpaint": "train_db.py",
    "#sd 1.5 masked": "train_db.py",
    "#sd 1.5": "train_db.py",
}
# Lines every preset's report has: the shared concepts and samples fixtures, and OneTrainer's minute cadences.
COMMON_REPORT = [
    "concepts[1] (regularization).text.prompt_source = filename: file names as captions are not supported; "
    "write .txt captions",
    "concepts[1] (regularization).image.enable_fixed_flip = true: always-flipped images are not supported; "
    "flip the files",
    "concepts[3] (held out).type = VALIDATION: left out: validation is off in OneTrainer (validation = false)",
    "samples[2].enabled = false: left out (disabled in OneTrainer)",
    "samples[3].noise_scheduler = UNIPC: no such sampler here; euler_a is used",
]


def convert(tmp_path: Path, config: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    main([str(config), "--output_dir", str(out), *extra])
    report = (out / "onetrainer_report.txt").read_text().splitlines()
    prompts = out / "sample_prompts.txt"
    return {
        "out": out,
        "config": toml.load(out / "config.toml"),
        "dataset": toml.load(out / "dataset.toml"),
        "prompts": prompts.read_text().splitlines() if prompts.exists() else None,
        "unmapped": [
            line.strip() for line in report[3 : report.index(next(x for x in report if x.startswith("conv")))]
        ],
        "report": report,
    }


def flat(config: dict) -> dict:
    return {k: v for section in config.values() for k, v in section.items()}


def check_parses(result: dict, script: str) -> None:
    """The written config parses with the script's real parser, the dataset TOML passes the schema and the
    prompt file loads."""
    parser = PARSERS[script]()
    values = read_config_file(result["out"] / "config.toml", parser)
    assert values["dataset_config"] == str(result["out"] / "dataset.toml")
    dataset = result["dataset"]
    validate_user_config(dataset, "dataset.toml")
    if result["prompts"] is not None:
        assert len(load_prompts(result["out"] / "sample_prompts.txt")) == len(result["prompts"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shipped_sd15_presets(preset: str, tmp_path: Path) -> None:
    result = convert(tmp_path, DATA / f"{preset}.json")
    script = PRESETS[preset]
    assert result["report"][0] == f"# OneTrainer {DATA / f'{preset}.json'} -> {script}"
    flags = flat(result["config"])
    assert flags["pretrained_model_name_or_path"].startswith("stable-diffusion-v1-5/")
    assert flags["mixed_precision"] == "fp16" and flags["no_half_vae"] is True and flags["sdpa"] is True
    assert flags["max_train_epochs"] == 100 and flags["max_grad_norm"] == 1.0
    assert flags["optimizer_type"] == "AdamW" and "optimizer_args" not in flags
    assert flags["output_dir"] == "models" and flags["save_precision"] == "float"
    assert flags["log_with"] == "tensorboard" and flags["logging_dir"] == "workspace/run/tensorboard"
    assert result["dataset"]["general"]["batch_size"] == (1 if "embedding" in preset else 4)
    assert [d["resolution"] for d in result["dataset"]["datasets"]] == [512]
    assert all(line in result["unmapped"] for line in COMMON_REPORT)
    check_parses(result, script)


def test_lora_preset_values(tmp_path: Path) -> None:
    result = convert(tmp_path, DATA / "#sd 1.5 LoRA.json")
    assert result["config"]["network"] == {"network_module": "networks.lora", "network_dim": 16, "network_alpha": 1}
    assert result["config"]["optimizer"] == {
        "optimizer_type": "AdamW",
        "max_grad_norm": 1.0,
        "learning_rate": 0.0003,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 200,
    }
    assert result["config"]["saving"]["output_name"] == "lora"
    assert "cache_latents_to_disk" not in result["config"]["training"]
    assert result["report"][-1] == (
        "  latent_caching = true: latents are not cached: the random rotation or colour jitter of "
        "concepts[0] (subject) changes the image every step"
    )
    subject, reg, style = result["dataset"]["datasets"][0]["subsets"]
    assert subject == {
        "image_dir": "dataset/subject",
        "recursive": True,
        "num_repeats": 2,
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "keep_tokens": 2,
        "caption_tag_dropout_rate": 0.1,
        "flip_aug": True,
        "random_crop": True,
        "rotate_aug_max_angle": 10,
        "brightness_aug": 0.1,
    }
    assert reg == {"image_dir": "dataset/reg", "num_repeats": 0.0072, "loss_weight": 0.5, "brightness_aug_fixed": 0.2}
    assert style == {
        "image_dir": "dataset/style",
        "balancing": 40,
        "balancing_strategy": "samples",
        "caption_extension": ".txt",
    }
    assert result["prompts"] == [
        "a photo of sks dog, in a park --n blurry, low quality --w 512 --h 640 --d 1234 --l 6 --s 25 "
        "--ss dpm++_2m_karras",
        "a painting of sks dog --w 512 --h 512 --l 7.5 --s 30 --ss euler_a",
        "a sketch of sks dog --w 512 --h 512 --d 42 --l 7.5 --s 30 --ss euler_a",
    ]
    assert result["unmapped"] == COMMON_REPORT
    assert result["config"]["training"] == {
        "max_train_epochs": 100,
        "gradient_accumulation_steps": 1,
        "max_data_loader_n_workers": 2,
        "text_encoder_train_until": "30epochs",
    }
    assert result["config"]["saving"] == {
        "output_dir": "models",
        "output_name": "lora",
        "save_model_as": "safetensors",
        "save_precision": "float",
        "backup_every_n_minutes": 10,
        "save_state_on_train_end": True,
    }
    assert "ema" not in result["config"] and "validation" not in result["config"]
    assert result["config"]["sampling"]["sample_every_n_minutes"] == 10


def test_embedding_and_masked_presets(tmp_path: Path) -> None:
    embedding = convert(tmp_path / "e", DATA / "#sd 1.5 embedding.json")
    assert embedding["config"]["embedding"] == {
        "token_string": "<embedding>",
        "init_word": "*",
        "num_vectors_per_token": 1,
    }
    assert embedding["config"]["optimizer"]["lr_warmup_steps"] == 20
    assert "cache_latents_to_disk" not in embedding["config"]["training"]
    assert embedding["dataset"]["datasets"][0]["subsets"][0]["random_crop"] is True
    assert embedding["config"]["sampling"]["sample_every_n_minutes"] == 1

    masked = convert(tmp_path / "m", DATA / "#sd 1.5 masked.json")
    assert masked["config"]["loss"] == {
        "masked_loss": True,
        "unmasked_probability": 0.1,
        "unmasked_weight": 0.1,
        "normalize_masked_area_loss": True,
    }
    assert masked["config"]["noise"] == {"min_noising_strength": 0, "max_noising_strength": 0.8}
    assert masked["config"]["saving"]["save_model_as"] == "safetensors"
    assert masked["config"]["training"]["text_encoder_train_until"] == "30epochs"
    assert "stop_text_encoder_training" not in masked["config"]["model"]
    assert masked["unmapped"] == COMMON_REPORT
    inpaint = convert(tmp_path / "i", DATA / "#sd 1.5 inpaint.json")
    assert inpaint["unmapped"][0].startswith("model_type = STABLE_DIFFUSION_15_INPAINTING: inpainting UNets")


def sdxl_config(folder: Path) -> Path:
    """An SDXL fine-tune as docs/onetrainer_sdxl.md's cheat sheet and issue 12 describe it (inline concepts)."""
    config = {
        "__version": 10,
        "training_method": "FINE_TUNE",
        "model_type": "STABLE_DIFFUSION_XL_10_BASE",
        "base_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
        "output_model_destination": "models/sdxl-finetune",
        "output_model_format": "DIFFUSERS",
        "resolution": "1024",
        "batch_size": 1,
        "learning_rate": 1e-5,
        "learning_rate_scheduler": "COSINE",
        "learning_rate_warmup_steps": 0.05,
        "train_dtype": "BFLOAT_16",
        "unet": {"train": True, "weight_dtype": "BFLOAT_16", "learning_rate": 2e-5},
        "text_encoder": {"train": False, "weight_dtype": "BFLOAT_16"},
        "text_encoder_2": {"train": False, "weight_dtype": "BFLOAT_16"},
        "vae": {"weight_dtype": "FLOAT_32"},
        "optimizer": {
            "optimizer": "ADAFACTOR",
            "fused_back_pass": True,
            "scale_parameter": False,
            "relative_step": False,
            "warmup_init": False,
            "eps": 1e-30,
            "eps2": 0.001,
            "clip_threshold": 1.0,
            "decay_rate": -0.8,
            "stochastic_rounding": True,
            "foreach": False,
        },
        "masked_training": True,
        "unmasked_probability": 0.1,
        "unmasked_weight": 0.1,
        "loss_weight_fn": "MIN_SNR_GAMMA",
        "loss_weight_strength": 5.0,
        "offset_noise_weight": 0.05,
        "ema": "GPU",
        "ema_decay": 0.999,
        "validation": True,
        "validate_after": 1,
        "sample_after": 5,
        "sample_after_unit": "EPOCH",
        "backup_after": 30,
        "backup_after_unit": "MINUTE",
        "save_every": 2,
        "save_every_unit": "EPOCH",
        "some_future_option": 3,
        "concepts": [
            {"name": "subject", "path": "data/subject"},
            {
                "name": "reg",
                "path": "data/reg",
                "balancing": 0.0072,
                "image": {
                    "enable_crop_jitter": False,
                    "enable_resolution_override": True,
                    "resolution_override": "768",
                },
            },
        ],
        "samples": [{"prompt": "a photo of sks dog", "seed": 7}],
    }
    path = folder / "config.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def test_sdxl_fine_tune(tmp_path: Path) -> None:
    result = convert(tmp_path, sdxl_config(tmp_path / "ot"))
    config = result["config"]
    assert result["report"][0].endswith("-> sdxl_train.py")
    assert config["model"]["full_bf16"] is True and config["model"]["mixed_precision"] == "bf16"
    assert "train_text_encoder" not in config["model"]
    assert config["optimizer"] == {
        "optimizer_type": "Adafactor",
        "optimizer_args": [
            "eps=1e-30,0.001",
            "clip_threshold=1.0",
            "decay_rate=-0.8",
            "scale_parameter=False",
            "relative_step=False",
            "warmup_init=False",
        ],
        "fused_backward_pass": True,
        "max_grad_norm": 1.0,
        "learning_rate": 2e-5,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0.05,
    }
    assert config["loss"] == {
        "min_snr_gamma": 5,
        "masked_loss": True,
        "unmasked_probability": 0.1,
        "unmasked_weight": 0.1,
    }
    assert config["noise"] == {"noise_offset": 0.05}
    assert config["saving"] == {
        "output_dir": "models",
        "output_name": "sdxl-finetune",
        "save_model_as": "diffusers",
        "save_precision": "float",
        "save_every_n_epochs": 2,
        "backup_every_n_minutes": 30,
        "save_state_on_train_end": True,
    }
    assert config["ema"] == {"ema": True, "ema_device": "same", "ema_decay": 0.999, "ema_update_every": 5}
    assert "validation" not in config and "unet_train_until" not in config["training"]
    assert config["sampling"]["sample_every_n_epochs"] == 5
    assert config["training"]["cache_latents_to_disk"] is True
    assert [(d["resolution"], [s["image_dir"] for s in d["subsets"]]) for d in result["dataset"]["datasets"]] == [
        (1024, ["data/subject"]),
        (768, ["data/reg"]),
    ]
    assert result["dataset"]["datasets"][1]["subsets"][0]["num_repeats"] == 0.0072
    assert result["prompts"] == ["a photo of sks dog --w 1024 --h 1024 --d 7 --l 7.5 --s 30 --ss euler_a"]
    assert result["unmapped"] == [
        "validation = true: no enabled concept of type VALIDATION, so nothing to validate on (OneTrainer validates "
        "only on those); validation_split in the dataset TOML holds out part of a subset instead",
        "concepts[0] (subject).image.enable_crop_jitter = true: not applied: random crops cannot be combined "
        "with latent caching",
        "some_future_option = 3: no equivalent here",
    ]
    assert result["report"][-2:] == [
        "  optimizer.stochastic_rounding = true: not supported: bf16 weights are rounded to nearest",
        "  non_ema_sampling = true: samples show the EMA weights only (OneTrainer adds a second set without EMA); "
        "add sample_without_ema = true to sample the trained weights instead",
    ]
    check_parses(result, "sdxl_train.py")


def test_concept_file_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ot"
    folder.mkdir()
    preset = folder / "lora.json"
    shutil.copy(DATA / "#sd 1.5 LoRA.json", preset)
    assert run_cli(main, [str(preset), "--output_dir", str(tmp_path / "o")]) != 0
    assert "concept_file_name 'training_concepts/concepts.json' not found" in capsys.readouterr().err
    concepts = folder / "mine.json"
    concepts.write_text(json.dumps([{"path": "imgs", "text": {"prompt_source": "sample"}}]))
    result = convert(tmp_path, preset, "--concept_file", str(concepts))
    assert result["dataset"]["datasets"][0]["subsets"] == [
        {"image_dir": "imgs", "num_repeats": 1, "caption_extension": ".txt"}
    ]
    assert result["prompts"] is None and "sampling" not in result["config"]
    assert result["unmapped"][-1].startswith("sample_definition_file_name = training_samples/samples.json: not found")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        main([str(preset), "--output_dir", str(tmp_path / "out"), "--concept_file", str(concepts)])
    main([str(preset), "--output_dir", str(tmp_path / "out"), "--concept_file", str(concepts), "--overwrite"])
    flux = folder / "flux.json"
    flux.write_text(json.dumps({"model_type": "FLUX_DEV_1", "training_method": "LORA", "concepts": []}))
    with pytest.raises(UserError, match="model_type FLUX_DEV_1: only Stable Diffusion 1.x, 2.x and SDXL"):
        main([str(flux), "--output_dir", str(tmp_path / "f")])
    broken = folder / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="the OneTrainer config is not valid JSON"):
        main([str(broken), "--output_dir", str(tmp_path / "b")])


def test_sdxl_lora_options_and_precision(tmp_path: Path) -> None:
    path = sdxl_config(tmp_path / "ot")
    config = json.loads(path.read_text())
    config.update(
        training_method="LORA",
        train_dtype="FLOAT_16",
        peft_type="LOKR",
        lora_rank=8,
        lora_alpha=4.0,
        lora_decompose=True,
        lokr_decompose_factor=4,
        layer_filter_preset="full",
        mse_strength=0.5,
        huber_strength=0.5,
        huber_delta=0.3,
        timestep_distribution="LOGIT_NORMAL",
        noising_weight=0.5,
        loss_weight_fn="P2",
        loss_weight_strength=1.0,
        ema="OFF",
        validation=False,
    )
    config["unet"]["weight_dtype"] = "FLOAT_16"
    config["text_encoder_2"]["learning_rate"] = 1e-5
    path.write_text(json.dumps(config))
    unet_only = convert(tmp_path / "u", path)
    assert unet_only["config"]["network"]["network_train_unet_only"] is True
    assert "text_encoder_lr" not in unet_only["config"]["network"]
    config["text_encoder"]["train"] = config["text_encoder_2"]["train"] = True
    path.write_text(json.dumps(config))
    result = convert(tmp_path, path)
    assert result["report"][0].endswith("-> sdxl_train_network.py")
    assert result["config"]["network"] == {
        "unet_lr": 2e-5,
        "text_encoder_lr": 1e-5,
        "network_module": "networks.lokr",
        "network_dim": 8,
        "network_alpha": 4,
        "network_args": ["dora_wd=true", "factor=4", "preset=full"],
    }
    assert result["config"]["loss"] == {
        "mse_strength": 0.5,
        "mae_strength": 0,
        "log_cosh_strength": 0,
        "huber_strength": 0.25,  # OneTrainer's 0.5 halved: our pseudo-Huber is about twice its Huber
        "huber_c": 0.3,
        "huber_schedule": "constant",
        "p2_loss_weight_gamma": 1,
        "masked_loss": True,
        "unmasked_probability": 0.1,
        "unmasked_weight": 0.1,
    }
    assert result["config"]["noise"] == {
        "noise_offset": 0.05,
        "timestep_distribution": "logit_normal",
        "noising_weight": 0.5,
    }
    assert result["config"]["model"]["mixed_precision"] == "fp16" and "full_fp16" not in result["config"]["model"]
    assert 'save_model_as = "safetensors"' in (result["out"] / "config.toml").read_text()
    assert result["config"]["training"]["text_encoder_train_until"] == "30epochs"
    assert result["unmapped"] == [
        "concepts[0] (subject).image.enable_crop_jitter = true: not applied: random crops cannot be combined "
        "with latent caching",
        "some_future_option = 3: no equivalent here",
    ]
    assert result["report"][-3:] == [
        "  output_model_format = DIFFUSERS: written with kohya's LoRA keys (OneTrainer's KOHYA_LORA)",
        "  text_encoder_2.learning_rate = 1e-05: one --text_encoder_lr for both encoders",
        "  huber_strength = 0.5: pseudo-Huber (smooth) instead of Huber, at half the strength because ours is about "
        "twice as large",
    ]
    check_parses(result, "sdxl_train_network.py")

    config.update(training_method="FINE_TUNE")
    path.write_text(json.dumps(config))
    fine_tune = convert(tmp_path / "ft", path)
    assert fine_tune["config"]["model"]["mixed_precision"] == "fp16" and fine_tune["config"]["model"]["full_fp16"]
    config["unet"]["weight_dtype"] = "BFLOAT_16"
    path.write_text(json.dumps(config))
    bf16 = convert(tmp_path / "bf", path)
    assert bf16["config"]["model"]["mixed_precision"] == "bf16" and bf16["config"]["model"]["full_bf16"]
    assert "  train_dtype = FLOAT_16: --mixed_precision bf16: --full_bf16 needs the same precision" in bf16["report"]


def test_wrong_types_are_one_line_errors(tmp_path: Path) -> None:
    path = sdxl_config(tmp_path / "ot")
    for key, value, message in (
        ("epochs", "ten", "epochs = 'ten' must be a number"),
        ("masked_training", 1, "masked_training = 1 must be true or false"),
        ("output_model_destination", 5, "output_model_destination = 5 must be text"),
    ):
        config = json.loads(path.read_text())
        config[key] = value
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps(config))
        with pytest.raises(UserError, match=re.escape(message)):
            main([str(bad), "--output_dir", str(tmp_path / key)])
        assert not (tmp_path / key).exists()
    config = json.loads(path.read_text())
    config["concepts"][1]["balancing"] = "lots"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"concepts\[1\] \(reg\): a setting has the wrong type"):
        main([str(path), "--output_dir", str(tmp_path / "c")])


def hand_written(folder: Path, **settings: object) -> Conversion:
    """A small SD1.5 LoRA config (a training and a VALIDATION concept, one sample) with ``settings`` merged in
    (dicts one level deep), translated without writing files."""
    config: dict = {
        "training_method": "LORA",
        "model_type": "STABLE_DIFFUSION_15",
        "concepts": [
            {"name": "subject", "path": "data/subject", "image": {"enable_crop_jitter": False}},
            {"name": "val", "path": "data/val", "type": "VALIDATION", "image": {"enable_crop_jitter": False}},
        ],
        "samples": [{"prompt": "a dog"}],
    }
    for key, value in settings.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"config{len(list(folder.iterdir()))}.json"
    path.write_text(json.dumps(config))
    return translate(load_onetrainer_config(path))


NON_EMA_SAMPLING = (
    "non_ema_sampling = true: samples show the EMA weights only (OneTrainer adds a second set without EMA); add "
    "sample_without_ema = true to sample the trained weights instead"
)


@pytest.mark.parametrize(
    ("settings", "section", "unmapped", "approximate"),
    [
        ({"ema": "OFF", "ema_decay": 0.9}, None, [], []),
        (
            {"ema": "GPU", "ema_decay": 0.995, "ema_update_step_interval": 1},
            {"ema": True, "ema_device": "same", "ema_decay": 0.995, "ema_update_every": 1},
            [],
            [NON_EMA_SAMPLING],
        ),
        (
            {"ema": "CPU", "non_ema_sampling": False},
            {"ema": True, "ema_device": "cpu", "ema_decay": 0.999, "ema_update_every": 5},
            [],
            [],
        ),
        (
            {"ema": "GPU", "samples": []},
            {"ema": True, "ema_device": "same", "ema_decay": 0.999, "ema_update_every": 5},
            [],
            [],
        ),
        ({"ema": "TPU"}, None, ["ema = TPU: no such EMA mode (OFF, GPU and CPU are); no EMA is kept"], []),
    ],
)
def test_ema_modes(tmp_path: Path, settings: dict, section: dict | None, unmapped: list, approximate: list) -> None:
    result = hand_written(tmp_path, **settings)
    assert result.flags.get("ema") == section
    assert result.unmapped == [
        *unmapped,
        "concepts[1] (val).type = VALIDATION: left out: validation is off in OneTrainer (validation = false)",
    ]
    assert [line for line in result.approximate if not line.startswith("output_model_format")] == approximate


VAL_SUBSET = {"image_dir": "data/val", "is_val": True, "num_repeats": 1, "caption_extension": ".txt"}
CLOCK = (
    "validate_after = {}: validation on the clock ({}) is not supported: set validate_every_n_steps or "
    "validate_every_n_epochs; the VALIDATION concepts are written as is_val subsets"
)


@pytest.mark.parametrize(
    ("validation", "after", "unit", "section", "unmapped"),
    [
        (True, 2, "EPOCH", {"validate_every_n_epochs": 2}, []),
        (True, 250, "STEP", {"validate_every_n_steps": 250}, []),
        (True, 1, "ALWAYS", {"validate_every_n_steps": 1}, []),
        (True, 30, "MINUTE", None, [CLOCK.format("30 MINUTE", "minutes")]),
        (True, 90.5, "SECOND", None, [CLOCK.format("90.5 SECOND", "seconds")]),
        (True, 2, "HOUR", None, [CLOCK.format("2 HOUR", "hours")]),
        (
            True,
            5,
            "NEVER",
            None,
            ["concepts[1] (val).type = VALIDATION: left out: OneTrainer never validates (validate_after = 5 NEVER)"],
        ),
        (
            True,
            0,
            "EPOCH",
            None,
            ["concepts[1] (val).type = VALIDATION: left out: OneTrainer never validates (validate_after = 0 EPOCH)"],
        ),
        (
            False,
            2,
            "STEP",
            None,
            ["concepts[1] (val).type = VALIDATION: left out: validation is off in OneTrainer (validation = false)"],
        ),
    ],
)
def test_validation_units(
    tmp_path: Path, validation: bool, after: float, unit: str, section: dict | None, unmapped: list
) -> None:
    result = hand_written(tmp_path, validation=validation, validate_after=after, validate_after_unit=unit)
    assert result.flags.get("validation") == section
    assert result.unmapped == unmapped
    subsets = result.dataset["datasets"][0]["subsets"]
    assert subsets[0] == {"image_dir": "data/subject", "num_repeats": 1, "caption_extension": ".txt"}
    validating = section is not None or unit in ("MINUTE", "SECOND", "HOUR")
    assert subsets[1:] == ([VAL_SUBSET] if validating else [])


def test_validation_without_validation_concepts(tmp_path: Path) -> None:
    concepts = [{"path": "data/subject"}, {"path": "data/off", "type": "VALIDATION", "enabled": False}]
    result = hand_written(tmp_path, validation=True, concepts=concepts)
    assert "validation" not in result.flags
    assert result.unmapped == [
        "validation = true: no enabled concept of type VALIDATION, so nothing to validate on (OneTrainer validates "
        "only on those); validation_split in the dataset TOML holds out part of a subset instead",
        "concepts[0] (data/subject).image.enable_crop_jitter = true: not applied: random crops cannot be combined "
        "with latent caching",
        "concepts[1] (data/off).enabled = false: left out (disabled in OneTrainer)",
    ]
    only_validation = [{"path": "data/val", "type": "VALIDATION"}]
    with pytest.raises(UserError, match=r"no enabled training concept \(of 1\); nothing to train on"):
        hand_written(tmp_path, validation=True, concepts=only_validation)


NEVER_TRAINS = "OneTrainer never trains the part: turn its training off"


@pytest.mark.parametrize(
    ("part", "after", "unit", "flags", "unmapped"),
    [
        ("text_encoder", 10, "STEP", {"text_encoder_train_until": "10steps"}, []),
        ("text_encoder", 3, "EPOCH", {"text_encoder_train_until": "3epochs"}, []),
        ("text_encoder", 30, "NEVER", {}, []),
        ("text_encoder", 0, "EPOCH", {}, [f"text_encoder.stop_training_after = 0 EPOCH: {NEVER_TRAINS}"]),
        ("text_encoder", 1, "ALWAYS", {}, [f"text_encoder.stop_training_after = 1 ALWAYS: {NEVER_TRAINS}"]),
        (
            "text_encoder",
            5,
            "MINUTE",
            {},
            [
                "text_encoder.stop_training_after = 5 MINUTE: a training window on the clock (minutes) is not "
                "supported: ours counts steps or epochs"
            ],
        ),
        ("unet", 500, "STEP", {"unet_train_until": "500steps", "text_encoder_train_until": "30epochs"}, []),
        ("unet", 4, "EPOCH", {"unet_train_until": "4epochs", "text_encoder_train_until": "30epochs"}, []),
        (
            "unet",
            2,
            "HOUR",
            {"text_encoder_train_until": "30epochs"},
            [
                "unet.stop_training_after = 2 HOUR: a training window on the clock (hours) is not supported: ours "
                "counts steps or epochs"
            ],
        ),
        (
            "unet",
            7,
            "SECOND",
            {"text_encoder_train_until": "30epochs"},
            [
                "unet.stop_training_after = 7 SECOND: a "
                "training window on the clock (seconds) is not supported: ours counts steps or epochs"
            ],
        ),
    ],
)
def test_training_windows(tmp_path: Path, part: str, after: int, unit: str, flags: dict, unmapped: list) -> None:
    result = hand_written(
        tmp_path, validation=True, **{part: {"stop_training_after": after, "stop_training_after_unit": unit}}
    )
    training = result.flags["training"]
    assert {k: v for k, v in training.items() if k.endswith("_train_until")} == flags
    assert result.unmapped == unmapped
    assert result.flags["validation"] == {"validate_every_n_epochs": 1}


def test_windows_per_method(tmp_path: Path) -> None:
    frozen = hand_written(tmp_path, training_method="FINE_TUNE", text_encoder={"train": False})
    assert frozen.flags["model"]["stop_text_encoder_training"] == -1
    assert "text_encoder_train_until" not in frozen.flags["training"]
    steps = hand_written(tmp_path, training_method="FINE_TUNE", text_encoder={"stop_training_after_unit": "STEP"})
    assert steps.flags["training"]["text_encoder_train_until"] == "30steps"
    assert "stop_text_encoder_training" not in steps.flags["model"]
    embedding = hand_written(tmp_path, training_method="EMBEDDING", unet={"stop_training_after_unit": "EPOCH"})
    assert not [k for k in embedding.flags["training"] if k.endswith("_train_until")]
    sdxl = hand_written(
        tmp_path,
        training_method="FINE_TUNE",
        model_type="STABLE_DIFFUSION_XL_10_BASE",
        text_encoder={"stop_training_after": 10, "stop_training_after_unit": "STEP"},
        text_encoder_2={"stop_training_after_unit": "NEVER"},
    )
    assert sdxl.flags["training"]["text_encoder_train_until"] == "10steps"
    assert sdxl.approximate[-1] == (
        "text_encoder_2.stop_training_after = 30: one text_encoder_train_until for both encoders: 10steps "
        "(text_encoder's: 10steps, text_encoder_2's: throughout)"
    )
    lora = hand_written(tmp_path, model_type="STABLE_DIFFUSION_XL_10_BASE")
    assert lora.flags["training"]["text_encoder_train_until"] == "30epochs"
    assert not [line for line in lora.approximate if "stop_training_after" in line]


def test_backup_at_end_and_hub_token(tmp_path: Path) -> None:
    result = hand_written(tmp_path, backup_before_save=False, secrets={"huggingface_token": "hf_secret"})
    assert "save_state_on_train_end" not in result.flags["saving"]
    assert result.unmapped == [
        "secrets.huggingface_token = (hidden): not copied (OneTrainer logs in with it to download gated models): run "
        "`huggingface-cli login` or set HF_TOKEN; our huggingface_token is for uploads to huggingface_repo_id",
        "concepts[1] (val).type = VALIDATION: left out: validation is off in OneTrainer (validation = false)",
    ]
    assert "hf_secret" not in repr(result)
    assert hand_written(tmp_path).flags["saving"]["save_state_on_train_end"] is True
