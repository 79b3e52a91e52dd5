"""Every example command of docs/sdxl.md runs as written on tiny-sdxl for one step, with the page's dataset TOML, and
writes what the page says it writes (sd-scripts' SDXL LoRA names, an SGM single file, clip_l/clip_g embeddings)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import toml
import torch

import sdxl_train
import sdxl_train_network
import sdxl_train_textual_inversion
from library.io import load_safetensors
from library.models.components import Components
from library.models.load import load_model
from tests.conftest import REPO
from tests.training import write_captioned_images

PAGE = REPO / "docs" / "sdxl.md"
SCRIPTS = {
    "sdxl_train_network.py": sdxl_train_network.main,
    "sdxl_train.py": sdxl_train.main,
    "sdxl_train_textual_inversion.py": sdxl_train_textual_inversion.main,
}
STEP_FLAGS = ("--max_train_steps", "--max_train_epochs")


def page_blocks(kind: str) -> list[str]:
    """The fenced ``kind`` blocks of docs/sdxl.md."""
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def page_commands() -> list[list[str]]:
    """Each ``bash`` block is one ``accelerate launch sdxl_….py`` command: its words."""
    commands = [shlex.split(block.replace("\\\n", " ")) for block in page_blocks("bash")]
    for words in commands:
        assert words[:2] == ["accelerate", "launch"] and words[2] in SCRIPTS, words[:3]
    return commands


def page_dataset(tmp_path: Path) -> Path:
    """The page's one TOML block at test scale: its keys kept, sizes at 64 px, batch 1, the image folder swapped."""
    (block,) = page_blocks("toml")
    config = toml.loads(block)
    assert config["general"]["bucket_reso_steps"] == 32
    config["general"].update(min_bucket_reso=32, max_bucket_reso=128)
    (dataset,) = config["datasets"]
    dataset.update(resolution=64, batch_size=1)
    images = write_captioned_images(
        tmp_path / "images", ["sks woman, smiling", "sks woman, outdoors"], sizes=[(64, 64), (96, 64)]
    )
    dataset["subsets"][0]["image_dir"] = str(images)
    path = tmp_path / "data.toml"
    path.write_text(toml.dumps(config))
    return path


def for_test(words: list[str], tmp_path: Path, data: Path, prompts: Path) -> list[str]:
    """The command's flags with the model, dataset, output folder, prompt file and length swapped for test ones."""
    swaps = {
        "--pretrained_model_name_or_path": "tiny-sdxl",
        "--dataset_config": str(data),
        "--output_dir": str(tmp_path / "out"),
        "--sample_prompts": str(prompts),
    }
    out: list[str] = []
    rest = words[3:]
    i = 0
    while i < len(rest):
        flag = rest[i]
        if flag in STEP_FLAGS:
            i += 2
            continue
        out.append(flag)
        if flag in swaps:
            out.append(swaps[flag])
            i += 2
            continue
        i += 1
    assert out.count("--output_dir") == 1 and out.count("--dataset_config") == 1, words
    return [*out, "--max_train_steps", "1"]


def check_frozen_parts(words: list[str], saved: Path) -> None:
    """What the page says this fine-tune trains changed, and what it freezes (rate 0) is bitwise the base model."""
    assert words[words.index("--learning_rate_te2") + 1] == "0"
    rates = [float(r) for r in words[words.index("--block_lr") + 1].split(",")]
    assert rates[1:10] == [0.0] * 9 and all(r > 0 for r in rates[10:])
    base, trained = load_model("tiny-sdxl"), load_model(saved)

    def parts(c: Components) -> dict[str, torch.nn.Module]:
        return {"unet": c.unet, "clip_l": c.text_encoders[0], "clip_g": c.text_encoders[1]}

    def changed(part: str, prefix: str = "") -> bool:
        """Whether the optimizer moved any weight: a frozen one equals the base model's, or its bf16 rounding
        (frozen weights are held in the mixed precision)."""
        before, after = parts(base)[part].state_dict(), parts(trained)[part].state_dict()
        keys = [k for k in before if k.startswith(prefix)]
        assert keys and before.keys() == after.keys()
        same = [torch.equal(after[k], before[k]) or torch.equal(after[k], before[k].bfloat16().float()) for k in keys]
        return not all(same)

    assert changed("clip_l") and not changed("clip_g")
    assert not changed("unet", "down_blocks.") and not changed("unet", "conv_in.")
    assert changed("unet", "mid_block.") and changed("unet", "up_blocks.") and changed("unet", "conv_out.")


def output_name(words: list[str]) -> str:
    return words[words.index("--output_name") + 1]


COMMANDS = page_commands()


def test_the_page_shows_every_script():
    assert {words[2] for words in COMMANDS} == set(SCRIPTS)
    assert len(COMMANDS) == 5


@pytest.mark.parametrize("words", COMMANDS, ids=[output_name(w) for w in COMMANDS])
def test_example_command_runs(words, tmp_path, monkeypatch, one_torch_thread):
    data = page_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of sks woman, portrait --n blurry --w 64 --h 64 --s 2 --l 7 --d 1\n")
    monkeypatch.chdir(tmp_path)
    SCRIPTS[words[2]](for_test(words, tmp_path, data, prompts))
    out = tmp_path / "out"
    name = output_name(words)
    if words[2] == "sdxl_train_network.py":
        tensors, metadata = load_safetensors(out / f"{name}.safetensors")
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        prefixes = {key.split("_block")[0] for key in tensors if key.startswith("lora_unet_")}
        assert prefixes == {"lora_unet_input", "lora_unet_middle", "lora_unet_output"}
        trains_text = "--network_train_unet_only" not in words
        assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors) == trains_text
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors) == trains_text
    if "--cache_text_encoder_outputs_to_disk" in words:
        assert sorted(p.name for p in (tmp_path / "images").glob("*_te_outputs.npz")) == [
            "img0_te_outputs.npz",
            "img1_te_outputs.npz",
        ]
    if "--sample_at_first" in words:
        assert len(list((out / "sample").glob(f"{name}_*.png"))) == 1
    if words[2] == "sdxl_train.py" and "safetensors" in words:
        tensors, _ = load_safetensors(out / f"{name}.safetensors")
        assert any(k.startswith("model.diffusion_model.input_blocks.") for k in tensors)
        assert any(k.startswith("conditioner.embedders.1.model.") for k in tensors)
        assert {t.dtype for k, t in tensors.items() if k.startswith("model.")} == {torch.float16}
    if words[2] == "sdxl_train.py" and "diffusers" in words:
        check_frozen_parts(words, out / name)
    if words[2] == "sdxl_train_textual_inversion.py":
        tensors, _ = load_safetensors(out / f"{name}.safetensors")
        vectors = int(words[words.index("--num_vectors_per_token") + 1])
        assert sorted(tensors) == ["clip_g", "clip_l"]
        assert tensors["clip_l"].shape[0] == tensors["clip_g"].shape[0] == vectors


def test_onetrainer_preset_translation_parses_in_the_lora_script():
    """The one-command translation of OneTrainer's LoRA preset (docs/onetrainer_sdxl.md) uses only real flags with
    valid values, and keeps the preset's numbers."""
    text = (REPO / "docs" / "onetrainer_sdxl.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```text\n(.*?)```", text, flags=re.S) if b.startswith("accelerate launch")]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["accelerate", "launch", "sdxl_train_network.py"]
    args = sdxl_train_network.setup_parser().parse_args(words[3:])
    assert (args.network_dim, args.network_alpha, args.learning_rate) == (16, 1.0, 3e-4)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.max_train_epochs) == ("constant_with_warmup", 200, 100)
    assert args.network_train_unet_only and args.no_half_vae and args.gradient_checkpointing
