"""sdxl_train.py end to end on the tiny SDXL model with real image files: full fine-tuning with and without the text
encoders, per-encoder and per-block learning rates (0 freezes exactly), every save format and precision, step-exact
resume, sd-scripts' memory flags, and ``--disable_mmap_load_safetensors``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

import sdxl_train
from library.cli import run_cli
from library.engine.launch import ModelSource, load_base_model
from library.models.convert import UNET_PREFIX, unet_to_ldm
from library.models.family import family_named
from library.models.load import load_model
from library.models.save import save_model
from library.models.sdxl_blocks import BLOCK_COUNT, block_index
from library.models.sgm_names import SgmNames
from library.models.tiny import tiny_model
from tests.test_sdxl_lora import SDXL_BASE_UNET
from tests.training import run_args, write_frog_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Weights = dict[str, dict[str, torch.Tensor]]
PARTS = ("unet", "te1", "te2", "vae")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(sdxl_dir) -> Weights:
    return weights(sdxl_dir)


def weights(path: Path | str, **load_options) -> Weights:
    """The UNet, both text encoders and the VAE of the model at ``path``, loaded as an SDXL model."""
    c = load_model(path, **load_options)
    assert c.family.name == "sdxl"
    modules = (c.unet, *c.text_encoders, c.vae)
    return {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in zip(PARTS, modules, strict=True)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(model: Path, data: Path, out: Path, *extra: str, name: str = "m") -> None:
    """sdxl_train.py at learning rate 1e-3 for 2 steps, saved as safetensors unless ``extra`` says otherwise."""
    argv = run_args(out, name=name, learning_rate="1e-3", seed=3, model=model)
    argv += ["--train_data_dir", str(data), "--caption_extension", ".txt", "--max_train_steps", "2"]
    sdxl_train.main([*argv, "--save_model_as", "safetensors", *extra])


@pytest.mark.parametrize("text", [False, True])
def test_full_fine_tune_trains_the_unet_and_with_the_flag_both_text_encoders(text, sdxl_dir, data_dir, base, tmp_path):
    train(sdxl_dir, data_dir, tmp_path, *(["--train_text_encoder"] if text else []))
    got = weights(tmp_path / "m.safetensors")
    assert not same(got["unet"], base["unet"]) and same(got["vae"], base["vae"])
    assert same(got["te1"], base["te1"]) is not text and same(got["te2"], base["te2"]) is not text


def test_learning_rate_te1_zero_freezes_te1_exactly(sdxl_dir, data_dir, base, tmp_path):
    train(
        sdxl_dir, data_dir, tmp_path, "--train_text_encoder", "--learning_rate_te1", "0", "--learning_rate_te2", "1e-3"
    )
    got = weights(tmp_path / "m.safetensors")
    assert same(got["te1"], base["te1"])
    assert not same(got["te2"], base["te2"]) and not same(got["unet"], base["unet"])


def sd_scripts_block(sgm_key: str) -> int:
    """sd-scripts' ``get_block_params_to_optimize`` rule (sdxl_train.py) on an SGM UNet parameter name."""
    name = sgm_key.removeprefix(UNET_PREFIX)
    first = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13, "out": 22}
    head, _, rest = name.partition(".")
    return first[head] + (int(rest.split(".")[0]) if head in ("input_blocks", "middle_block", "output_blocks") else 0)


@pytest.mark.parametrize("size", ["tiny", "sdxl_base"])
def test_block_index_agrees_with_the_sgm_conversion(size):
    """Every UNet parameter's block, from its diffusers name, equals sd-scripts' block of the SGM key the
    single-file conversion (library.models.convert.unet_to_ldm) gives the same tensor."""
    if size == "tiny":
        unet = tiny_model(family_named("sdxl")).unet
    else:
        with init_empty_weights():
            unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    state = unet.state_dict()
    sgm_names = {id(v): k for k, v in unet_to_ldm(state, unet.config).items()}
    names = SgmNames(unet.config)
    got = {k: block_index(k, names) for k in state}
    expected = {k: sd_scripts_block(sgm_names[id(v)]) for k, v in state.items()}
    assert got == expected
    assert set(got.values()) == set(range(BLOCK_COUNT))  # SDXL's topology fills all 23 blocks


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_block_lr_zero_freezes_exactly_those_blocks(sdxl_dir, data_dir, base, tmp_path, precision):
    """Under bf16 mixed precision too: the trained UNet is never cast down, so frozen blocks keep every bit."""
    frozen = {0, 3, 7, 11, 16, 22}
    rates = ["0" if i in frozen else "1e-3" for i in range(BLOCK_COUNT)]
    train(sdxl_dir, data_dir, tmp_path, "--block_lr", ",".join(rates), "--mixed_precision", precision)
    got = weights(tmp_path / "m.safetensors")
    names = SgmNames(load_model(sdxl_dir).unet.config)
    changed: dict[int, bool] = {}
    for key, value in got["unet"].items():
        block = block_index(key, names)
        changed[block] = changed.get(block, False) or not torch.equal(value, base["unet"][key])
    assert {block for block, moved in changed.items() if not moved} == frozen
    assert len(changed) == BLOCK_COUNT


def test_every_format_and_fp16_load_back_with_the_trained_weights(sdxl_dir, data_dir, tmp_path):
    files = {"ckpt": "m.ckpt", "safetensors": "m.safetensors", "diffusers": "m", "diffusers_safetensors": "m"}
    loaded = {}
    for save_as, name in files.items():
        train(sdxl_dir, data_dir, tmp_path / save_as, "--train_text_encoder", "--save_model_as", save_as)
        loaded[save_as] = weights(tmp_path / save_as / name)
    train(sdxl_dir, data_dir, tmp_path / "fp16", "--train_text_encoder", "--save_precision", "fp16")
    half = load_model(tmp_path / "fp16" / "m.safetensors", dtype=torch.float16)
    assert half.family.name == "sdxl" and half.unet.dtype == torch.float16
    reference = loaded["safetensors"]
    for save_as, got in loaded.items():
        assert all(same(got[part], reference[part]) for part in PARTS), save_as
    expected_half = {k: v.half() for k, v in reference["unet"].items()}
    assert same(dict(half.unet.state_dict()), expected_half)
    assert same(dict(half.text_encoders[1].state_dict()), {k: v.half() for k, v in reference["te2"].items()})


def test_resume_is_step_exact(sdxl_dir, data_dir, tmp_path):
    extra = ["--train_text_encoder", "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state"]
    extra += ["--lr_scheduler", "cosine"]
    train(sdxl_dir, data_dir, tmp_path / "straight", *extra)
    state = tmp_path / "straight" / "m-step00000002-state"
    assert state.is_dir()
    train(sdxl_dir, data_dir, tmp_path / "resumed", *extra, "--resume", str(state))
    straight, resumed = (
        weights(tmp_path / "straight" / "m.safetensors"),
        weights(tmp_path / "resumed" / "m.safetensors"),
    )
    assert all(same(resumed[part], straight[part]) for part in PARTS)


def test_fused_optimizer_groups_is_refused_in_one_line(sdxl_dir, data_dir, tmp_path, capsys):
    argv = run_args(tmp_path, name="m", learning_rate="1e-3", seed=3, model=sdxl_dir)
    argv += ["--train_data_dir", str(data_dir), "--fused_optimizer_groups", "2"]
    assert run_cli(sdxl_train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --fused_optimizer_groups 2: ") and "--fused_backward_pass" in err[-1]


@pytest.mark.parametrize(
    "extra",
    [
        ["--fused_backward_pass", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False"],
        ["--full_bf16", "--mixed_precision", "bf16"],
    ],
    ids=["fused_backward_pass", "full_bf16"],
)
def test_memory_flags_train(extra, sdxl_dir, data_dir, base, tmp_path):
    train(sdxl_dir, data_dir, tmp_path, "--train_text_encoder", *extra)
    got = weights(tmp_path / "m.safetensors")
    assert not same(got["unet"], base["unet"]) and not same(got["te2"], base["te2"])
    assert all(torch.isfinite(v).all() for part in ("unet", "te1", "te2") for v in got[part].values())


def test_disable_mmap_load_safetensors_reads_the_same_weights_into_memory(sdxl_dir, data_dir, base, tmp_path):
    """The weights equal the memory-mapped read's; they are the process's own: overwriting the file in place
    afterwards leaves them unchanged (memory-mapped weights would follow the file)."""
    single = save_model(load_model(sdxl_dir), tmp_path / "sdxl.safetensors", "safetensors")
    read = load_base_model(ModelSource(pretrained_model_name_or_path=str(single), disable_mmap_load_safetensors=True))
    modules = (read.unet, *read.text_encoders, read.vae)
    size = single.stat().st_size
    with open(single, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    assert read.family.name == "sdxl"
    assert all(same(dict(m.state_dict()), base[part]) for part, m in zip(PARTS, modules, strict=True))
    restored = save_model(load_model(sdxl_dir), tmp_path / "again.safetensors", "safetensors")
    assert all(same(got, base[part]) for part, got in weights(restored, disable_mmap=True).items())
    train(restored, data_dir, tmp_path / "out", "--disable_mmap_load_safetensors")
    trained = weights(tmp_path / "out" / "m.safetensors")
    assert not same(trained["unet"], base["unet"]) and same(trained["te1"], base["te1"])
