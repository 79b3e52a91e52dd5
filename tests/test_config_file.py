"""--config_file / --output_config: flattened sections, command line wins, strict keys and values, round trip."""

from __future__ import annotations

import argparse

import pytest

from library.config.config_file import add_config_arguments, parse_args_with_config
from library.config.engine_flags import (
    add_network_arguments,
    add_saving_arguments,
    add_tracking_arguments,
    add_training_arguments,
)
from library.config.flags import add_dataset_arguments
from library.errors import UserError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for add in (
        add_training_arguments,
        add_saving_arguments,
        add_tracking_arguments,
        add_network_arguments,
        add_dataset_arguments,
        add_config_arguments,
    ):
        add(parser)
    return parser


CONFIG = """
output_name = "frog"

[training]
max_train_steps = 300
mixed_precision = "bf16"
gradient_checkpointing = true

[network]
network_dim = 8
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=1"]

[dataset]
resolution = 512
"""


def test_sections_are_flattened_and_the_command_line_wins(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG)
    args = parse_args_with_config(make_parser(), ["--config_file", str(path), "--network_dim", "16"])
    assert args.output_name == "frog"
    assert (args.max_train_steps, args.mixed_precision, args.gradient_checkpointing) == (300, "bf16", True)
    assert (args.network_dim, args.network_alpha) == (16, 4.0)
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.resolution == "512"
    assert args.save_model_as == "safetensors" and args.max_train_epochs is None


def test_toml_suffix_is_added_like_sd_scripts(tmp_path):
    (tmp_path / "cfg.toml").write_text("max_train_steps = 5\n")
    args = parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / "cfg")])
    assert args.max_train_steps == 5


# Wrong shapes an outside fuzzer tried: each must be one UserError line naming the file (never a TypeError).
WRONG_SHAPES = [
    ("[training]\nmax_train_steps = {a = 1}\n", "cfg.toml: max_train_steps: expected a single value, got a table"),
    ("[training.max_train_steps]\na = 1\n", "cfg.toml: max_train_steps: expected a single value, got a table"),
    ("max_train_steps = [1, 2]\n", "cfg.toml: max_train_steps: expected a single value, got a list [1, 2]"),
    ("network_args = [['a=1']]\n", "cfg.toml: network_args: expected a single value, got a list ['a=1']"),
    ("network_args = [{a = 1}]\n", "cfg.toml: network_args: expected a single value, got a table {'a': 1}"),
    ("output_name = ['a', 'b']\n", "cfg.toml: output_name: expected a single value, got a list"),
    ("output_name = true\n", "cfg.toml: output_name: expected text, got true"),
    ("gradient_checkpointing = [true]\n", "cfg.toml: gradient_checkpointing: expected true or false, got [True]"),
    ("gradient_checkpointing = 2\n", "cfg.toml: gradient_checkpointing: expected true or false, got 2"),
    ("network_dim = 1979-05-27\n", "cfg.toml: network_dim must be a whole number of at least 1, got datetime.date"),
    ("[a]\n[[a]]\n", "cfg.toml: not valid TOML (AttributeError"),
    ("'a'=1\n[['a']]\n", "cfg.toml: not valid TOML"),
    ("a = 1\n[a]\nb = 2\n", "cfg.toml: not valid TOML"),
    ("network_args = [1, 'x']\n", "cfg.toml: not valid TOML"),
    ("[[training]]\nseed = 1\n", "cfg.toml: unknown key 'training'"),
    ("[[datasets]]\nbatch_size = 1\n", "cfg.toml: [[datasets]] is dataset config; pass this file with --dataset_"),
    ("config_file = 'other.toml'\n", "cfg.toml: 'config_file' cannot be set inside a config file"),
]


@pytest.mark.parametrize(
    "text, message",
    [
        *WRONG_SHAPES,
        ("[net]\nnetwork_dims = 4\n", "cfg.toml: unknown key 'network_dims' (did you mean 'network_dim'?)"),
        ("max_train_steps = 'many'\n", "cfg.toml: max_train_steps must be a whole number of at least 1, got 'many'"),
        ("max_train_steps = 2.5\n", "cfg.toml: max_train_steps must be a whole number of at least 1, got 2.5"),
        ("mixed_precision = 'fp32'\n", "cfg.toml: mixed_precision: 'fp32' is not one of: no, fp16, bf16"),
        ("gradient_checkpointing = 'yes'\n", "cfg.toml: gradient_checkpointing: expected true or false, got 'yes'"),
        ("[a]\nseed = 1\n[b]\nseed = 2\n", "cfg.toml: key 'seed' is set both in [a] and in [b]; keep one"),
        ("max_train_steps = \n", "cfg.toml: not valid TOML"),
    ],
)
def test_bad_config_files_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        parse_args_with_config(make_parser(), ["--config_file", str(path)])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="--config_file .*nope.toml: file not found"):
        parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / "nope.toml")])


def test_output_config_writes_the_effective_flags_and_reads_back(tmp_path):
    path = tmp_path / "written.toml"
    argv = ["--network_dim", "32", "--network_args", "conv_dim=2", "--resolution", "64,96", "--gradient_checkpointing"]
    assert parse_args_with_config(make_parser(), [*argv, "--config_file", str(path), "--output_config"]) is None
    text = path.read_text()
    assert "network_dim = 32\n" in text and "config_file" not in text and "output_config" not in text
    from_file = parse_args_with_config(make_parser(), ["--config_file", str(path)])
    direct = make_parser().parse_args(argv)
    assert {k: v for k, v in vars(from_file).items() if k != "config_file"} == {
        k: v for k, v in vars(direct).items() if k != "config_file"
    }
    with pytest.raises(UserError, match="already exists"):
        parse_args_with_config(make_parser(), [*argv, "--config_file", str(path), "--output_config"])


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("output_name = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.toml: not a UTF-8 text file; save it as UTF-8 TOML$"):
        parse_args_with_config(make_parser(), ["--config_file", str(path)])
    with pytest.raises(UserError, match=r"^--config_file \.\.\.x+\.toml: cannot read it \(File name too long\)$"):
        parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / ("x" * 5000))])
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(UserError, match=r"folder.toml: file not found$"):
        parse_args_with_config(make_parser(), ["--config_file", str(tmp_path / "folder.toml")])


def test_text_encoder_lr_takes_sd_scripts_list_and_collapses_to_one_value(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("text_encoder_lr = [5e-5, 5e-5]\n")
    assert parse_args_with_config(make_parser(), ["--config_file", str(path)]).text_encoder_lr == 5e-5
    path.write_text("text_encoder_lr = 5e-5\n")
    assert parse_args_with_config(make_parser(), ["--config_file", str(path)]).text_encoder_lr == 5e-5
    path.write_text("text_encoder_lr = []\n")
    assert parse_args_with_config(make_parser(), ["--config_file", str(path)]).text_encoder_lr is None
    path.write_text("text_encoder_lr = [5e-5, 1e-4]\n")
    message = r"cfg.toml: text_encoder_lr: got different values \[5e-05, 0.0001\], but networks.lora trains every"
    with pytest.raises(UserError, match=message):
        parse_args_with_config(make_parser(), ["--config_file", str(path)])
    assert make_parser().parse_args(["--text_encoder_lr", "1e-4", "1e-4"]).text_encoder_lr == 1e-4


# What kohya_ss's lora_gui.py writes for an SD 1.5 LoRA (its config_toml_data, "" / False / None dropped), plus
# keys older versions wrote: "" for empty fields, `use_wandb`, `lora_network_weights`, zeros. (It also writes
# `dynamo_backend = "no"`, a real sd-scripts flag defined with the runtime flags; tested in test_sd_scripts_flags.)
KOHYA_SS_LORA = """
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_dropout_every_n_epochs = 0
caption_extension = ".txt"
clip_skip = 1
enable_bucket = true
epoch = 10
gradient_accumulation_steps = 1
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
keep_tokens = 0
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
lr_warmup_steps = 50
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 1600
min_bucket_reso = 256
mixed_precision = "fp16"
multires_noise_discount = 0.3
network_alpha = 1
network_args = []
network_dim = 8
network_dropout = 0
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW8bit"
output_dir = "/out"
output_name = "last"
persistent_data_loader_workers = 1
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
prior_loss_weight = 1
resolution = "512,512"
sample_prompts = "/out/prompt.txt"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
scale_weight_norms = 0
sdpa = true
seed = 1234
text_encoder_lr = [0.0001, 0.0001]
train_batch_size = 1
train_data_dir = "/data/img"
unet_lr = 0.0001
wandb_run_name = "last"
log_with = "tensorboard"
stop_text_encoder_training = 20
weigts = ""
use_wandb = false
lora_network_weights = "/old.safetensors"
resume = ""
reg_data_dir = ""
vae = ""
caption_prefix = ""
metadata_title = ""
"""


def test_kohya_ss_config_parses_with_one_warning_for_its_own_keys(tmp_path, caplog):
    path = tmp_path / "config_lora-20240101-120000.toml"
    path.write_text(KOHYA_SS_LORA)
    import train_network

    parser = train_network.setup_parser()
    with caplog.at_level("WARNING", logger="sdtrain"):
        args = parse_args_with_config(parser, ["--config_file", str(path)])
    warnings = [r.getMessage() for r in caplog.records if r.name == "sdtrain" and r.levelname == "WARNING"]
    assert warnings == [
        f"{path}: ignoring kohya_ss GUI setting(s) that {parser.prog} has no flag for: epoch, noise_offset_type, "
        "stop_text_encoder_training, use_wandb, lora_network_weights"
    ]
    assert args.persistent_data_loader_workers is True and args.text_encoder_lr == 1e-4
    assert (args.resume, args.reg_data_dir, args.vae, args.caption_prefix, args.metadata_title) == (None,) * 5
    assert (args.network_dropout, args.scale_weight_norms, args.network_args, args.lr_scheduler_args) == (0, 0, [], [])
    assert not hasattr(args, "epoch") and not hasattr(args, "weigts")


def test_typos_are_still_refused_even_next_to_kohya_ss_keys(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("epoch = 3\nnoise_offset_type = 'Original'\nnetwork_dmi = 4\n")
    with pytest.raises(UserError, match=r"unknown key 'network_dmi' \(did you mean 'network_dim'\?\)"):
        parse_args_with_config(make_parser(), ["--config_file", str(path)])


@pytest.mark.parametrize("script", ["train_network", "train_db", "fine_tune", "train_textual_inversion"])
def test_output_config_of_every_script_reads_back_and_never_holds_the_hub_token(script, tmp_path):
    import importlib

    setup = importlib.import_module(script).setup_parser
    path = tmp_path / "written.toml"
    argv = ["--seed", "7", "--huggingface_token", "hf_secret", "--caption_dropout_rate", "0.25"]
    argv += ["--text_encoder_lr", "1e-4", "1e-4"] if script == "train_network" else []
    assert parse_args_with_config(setup(), [*argv, "--config_file", str(path), "--output_config"]) is None
    assert "hf_secret" not in path.read_text() and "huggingface_token" not in path.read_text()
    back = vars(parse_args_with_config(setup(), ["--config_file", str(path)]))
    direct = vars(setup().parse_args(argv))
    skipped = ("config_file", "huggingface_token")
    assert {k: v for k, v in back.items() if k not in skipped} == {k: v for k, v in direct.items() if k not in skipped}
    assert back["seed"] == 7 and back["caption_dropout_rate"] == 0.25


def test_booleans_for_step_counts_are_refused(tmp_path):
    import train_network

    path = tmp_path / "cfg.toml"
    path.write_text("lr_warmup_steps = true\n")
    with pytest.raises(UserError, match=r"cfg.toml: lr_warmup_steps: expected a value of this flag's kind, got true$"):
        parse_args_with_config(train_network.setup_parser(), ["--config_file", str(path)])
