"""gen_img.py on the tiny SD1 model: seeds, LoRA files hooked and merged, X/Y grids, prompt-file options, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.cli import run_cli
from library.generate.grid import HEADER_HEIGHT, HEADER_WIDTH
from library.generate.networks import file_label
from library.io import save_safetensors
from library.models.tiny import make_tiny_model
from tests.training import write_captioned_images

BASE = ["--ckpt", "tiny-sd1", "--W", "64", "--H", "64", "--steps", "2", "--scale", "4"]
# hooking a LoRA and merging it into the weights (or batching images) round differently in float32: 8-bit images may
# differ by this many levels (measured: 0)
TOLERANCE = 1


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, one_torch_thread) -> Path:
    """A rank-4 LoRA of the tiny SD1 model (UNet and text encoder) with random non-zero up weights."""
    from networks.lora import create_network

    c = make_tiny_model()
    torch.manual_seed(7)
    network = create_network(1.0, 4, 4, c.vae, c.text_encoder, c.unet)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("lora") / "frog.safetensors"
    network.save_weights(str(path), None, {"ss_epoch": "3"})
    return path


def generate(out: Path, *extra: str) -> list[Path]:
    """Run gen_img.py in-process into ``out``; the images it wrote, in index order."""
    gen_img.main([*BASE, "--outdir", str(out), *extra])
    return sorted(out.glob("im_*.png"), key=lambda p: int(p.stem.split("_")[2]))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_same_seed_gives_the_same_files_and_metadata(tmp_path, one_torch_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a frog --n blurry\n# comment\na cat on a mat --l 6\n")
    first = generate(tmp_path / "a", "--from_file", str(prompts), "--seed", "5", "--images_per_prompt", "2")
    second = generate(tmp_path / "b", "--from_file", str(prompts), "--seed", "5", "--images_per_prompt", "2")
    assert len(first) == 4
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    info = [Image.open(p).text for p in first]
    assert [i["prompt"] for i in info] == ["a frog", "a frog", "a cat on a mat", "a cat on a mat"]
    assert [i["negative-prompt"] for i in info] == ["blurry", "blurry", "", ""]
    assert [(i["steps"], i["sampler"]) for i in info] == [("2", "ddim")] * 4
    assert [i["scale"] for i in info] == ["4.0", "4.0", "6.0", "6.0"]
    seeds = [int(i["seed"]) for i in info]
    assert len(set(seeds)) == 4 and all(p.stem.endswith(f"_{s}") for p, s in zip(first, seeds))
    assert pixels(first[0]).tolist() != pixels(first[1]).tolist()  # two seeds, two images
    batched = generate(tmp_path / "c", "--from_file", str(prompts), "--seed", "5", "--images_per_prompt", "2",
                       "--batch_size", "2")  # fmt: skip
    for one, two in zip(first, batched):  # batching changes float rounding only
        assert np.abs(pixels(one) - pixels(two)).max() <= TOLERANCE


def test_lora_weight_zero_is_the_base_model_and_merge_matches_hooks(tmp_path, lora_file, one_torch_thread):
    base = generate(tmp_path / "base", "--prompt", "a frog", "--seed", "3")[0]
    zero = generate(tmp_path / "zero", "--prompt", "a frog", "--seed", "3", "--lora", f"{lora_file}:0")[0]
    sd_scripts_args = ["--network_module", "networks.lora", "--network_weights", str(lora_file)]
    hooked = generate(tmp_path / "hook", "--prompt", "a frog", "--seed", "3", *sd_scripts_args, "--network_mul", "0.8")
    merged = generate(tmp_path / "merge", "--prompt", "a frog", "--seed", "3", *sd_scripts_args, "--network_mul", "0.8",
                      "--network_merge")  # fmt: skip
    assert pixels(zero).tolist() == pixels(base).tolist()
    assert np.abs(pixels(hooked[0]) - pixels(base)).mean() > 5  # the LoRA changes the image
    assert np.abs(pixels(merged[0]) - pixels(hooked[0])).max() <= TOLERANCE
    assert Image.open(hooked[0]).text["networks"] == "frog:0.8"


def test_grid_of_weights_by_prompts(tmp_path, lora_file, one_torch_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a frog\na red cat\n")
    out = tmp_path / "grid"
    cells = generate(out, "--from_file", str(prompts), "--seed", "9", "--lora", str(lora_file),
                     "--xy_lora_weights", "1,0,0.5")  # fmt: skip
    grid_files = list(out.glob("grid_*.png"))
    assert len(grid_files) == 1 and len(cells) == 6
    grid = np.asarray(Image.open(grid_files[0]).convert("RGB"), dtype=np.int16)
    assert grid.shape == (HEADER_HEIGHT + 2 * 64, HEADER_WIDTH + 3 * 64, 3)
    # cells were written column by column (one weight, both prompts), the grid has prompts as rows
    for n, cell in enumerate(cells):
        column, row = divmod(n, 2)
        top, left = HEADER_HEIGHT + row * 64, HEADER_WIDTH + column * 64
        assert grid[top : top + 64, left : left + 64].tolist() == pixels(cell).tolist()
    assert Image.open(cells[4]).text["networks"] == "frog:0.5"
    assert grid[:HEADER_HEIGHT, HEADER_WIDTH:].min() < 128  # labels were drawn (dark on white)
    # each row keeps its prompt's seed across the weights; weight 0, made after weight 1 was taken off again, is
    # exactly the base model
    seeds = [Image.open(p).text["seed"] for p in cells]
    assert seeds[0::2] == [seeds[0]] * 3 and seeds[1::2] == [seeds[1]] * 3
    base = generate(tmp_path / "base", "--from_file", str(prompts), "--seed", "9")
    assert [pixels(p).tolist() for p in base] == [pixels(p).tolist() for p in cells[2:4]]


def test_grid_over_epoch_files_from_train_network(tmp_path, one_torch_thread):
    import train_network

    data = write_captioned_images(tmp_path / "data" / "1_frog", ["a frog"])
    lora_out = tmp_path / "lora"
    train_network.main(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(data.parent),
                        "--resolution", "64", "--output_dir", str(lora_out), "--output_name", "frog",
                        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
                        "--learning_rate", "0.05", "--optimizer_type", "AdamW", "--seed", "1",
                        "--max_train_epochs", "2", "--save_every_n_epochs", "1"])  # fmt: skip
    assert sorted(p.name for p in lora_out.glob("*.safetensors")) == ["frog-000001.safetensors", "frog.safetensors"]
    out = tmp_path / "grid"
    cells = generate(out, "--prompt", "a frog", "--seed", "2", "--xy_lora_files", str(lora_out / "frog*.safetensors"))
    grid = Image.open(next(out.glob("grid_*.png")))
    assert grid.size == (HEADER_WIDTH + 2 * 64, HEADER_HEIGHT + 64) and len(cells) == 2
    assert [Image.open(p).text["networks"] for p in cells] == ["frog-000001:1", "frog:1"]
    assert pixels(cells[0]).tolist() != pixels(cells[1]).tolist()  # epoch 1 and epoch 2 differ
    assert file_label(str(lora_out / "frog.safetensors")) == "frog (epoch 2)"  # the grid's column label


def test_prompt_file_options_are_honoured(tmp_path, one_torch_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a frog --n a dog --d 77 --w 72 --h 64 --s 3\n")
    with_options = generate(tmp_path / "a", "--from_file", str(prompts), "--seed", "1")
    (path,) = with_options
    assert Image.open(path).size == (72, 64) and path.stem.endswith("_77")
    assert {k: Image.open(path).text[k] for k in ("seed", "negative-prompt", "steps")} == {
        "seed": "77",
        "negative-prompt": "a dog",
        "steps": "3",
    }
    plain = generate(tmp_path / "b", "--prompt", "a frog --d 77 --w 72 --s 3")[0]
    assert pixels(plain).tolist() != pixels(path).tolist()  # the negative prompt changed it


def test_textual_inversion_embedding_is_a_new_token(tmp_path, one_torch_thread):
    embedding = tmp_path / "frogtok.safetensors"
    save_safetensors({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, embedding)
    with_embedding = generate(tmp_path / "a", "--prompt", "a frogtok", "--seed", "4",
                              "--textual_inversion_embeddings", str(embedding))[0]  # fmt: skip
    without = generate(tmp_path / "b", "--prompt", "a frogtok", "--seed", "4")[0]
    assert Image.open(with_embedding).text["prompt"] == "a frogtok frogtok1"  # sd-scripts' token expansion
    assert pixels(with_embedding).tolist() != pixels(without).tolist()


def _wrong_shape_lora(path: Path, lora_file: Path) -> Path:
    from library.io import load_safetensors

    tensors = load_safetensors(lora_file)[0]
    key = next(k for k in tensors if k.endswith("lora_down.weight") and k.startswith("lora_unet"))
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)
    save_safetensors(tensors, path)
    return path


def _sdxl_lora(path: Path) -> Path:
    save_safetensors(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
            "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0),
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "x", "--sampler", "nope"], "--sampler: unknown sampler 'nope'"),
        (["--prompt", "x", "--highres_fix_scale", "0.5"], "--highres_fix_scale not supported here"),
        (["--from_file", "missing.txt"], "--from_file missing.txt: file not found"),
        (["--prompt", "x", "--lora", "nofile.safetensors:1"], "nofile.safetensors: network file not found"),
        (["--prompt", "x", "--xy_lora_weights", "0,a", "--lora", "f"], "--xy_lora_weights '0,a': write comma"),
        (["--prompt", "x", "--lora", "{sdxl}"], "sdxl.safetensors: no key of this file matches the model"),
        (["--prompt", "x", "--lora", "{shape}"], "shape.safetensors: does not fit this model"),
        (["--prompt", "x", "--network_merge", "--lora", "{shape}"], "shape.safetensors: does not fit this model"),
        (["--prompt", "x", "--sdxl"], "--sdxl: tiny-sd1 is an SD 1.x"),
        (["--prompt", "x", "--textual_inversion_embeddings", "{emb}"], "width 16, this model's text encoder needs 32"),
    ],
)
def test_bad_input_is_one_line(tmp_path, lora_file, capsys, one_torch_thread, extra, message):
    sdxl, shape = (
        _sdxl_lora(tmp_path / "sdxl.safetensors"),
        _wrong_shape_lora(tmp_path / "shape.safetensors", lora_file),
    )
    emb = tmp_path / "wide.safetensors"
    save_safetensors({"emb_params": torch.zeros(1, 16)}, emb)
    argv = [*BASE, "--outdir", str(tmp_path / "out"), *(a.format(sdxl=sdxl, shape=shape, emb=emb) for a in extra)]
    assert run_cli(gen_img.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err
    assert not list((tmp_path / "out").glob("*.png"))
