"""Shared set-up for the end-to-end training tests: the tiny SD1 model on disk, small captioned image folders, dataset
TOML files and the base command line of a training run, so each test states only what differs; and the comparison
of saved model weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import toml
import torch

from library.models.load import load_model
from library.models.tiny import make_tiny_model
from tests.images import write_image


def save_tiny_model(parent: Path) -> Path:
    """Save the tiny SD1 model as the diffusers folder ``parent/tiny`` (for ``--pretrained_model_name_or_path``)."""
    folder = parent / "tiny"
    make_tiny_model().to_pipeline().save_pretrained(folder)
    return hub_tokenizer_files(folder)


def hub_tokenizer_files(folder: Path) -> Path:
    """Replace each ``tokenizer*/tokenizer.json`` under the diffusers ``folder`` by the same BPE as ``vocab.json`` and
    ``merges.txt``, the layout of the Stable Diffusion repos on the Hub, which transformers loads in a third of the
    time (each training run loads the model again, so this saves about a second per run); return ``folder``."""
    for path in sorted(folder.glob("tokenizer*/tokenizer.json")):
        bpe = json.loads(path.read_text(encoding="utf-8"))["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (path.parent / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
        (path.parent / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        path.unlink()
    return folder


def write_captioned_images(
    folder: Path,
    captions: Sequence[str | None],
    *,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
    stem: str = "img",
) -> Path:
    """Write ``{stem}{i}.png`` (noise seeded ``seed + i``, 64x64 unless ``sizes`` says) and, where ``captions[i]`` is
    not None, ``{stem}{i}.txt`` holding it; return ``folder``."""
    for i, caption in enumerate(captions):
        size = (64, 64) if sizes is None else sizes[i]
        write_image(folder / f"{stem}{i}.png", size=size, seed=seed + i)
        if caption is not None:
            (folder / f"{stem}{i}.txt").write_text(caption)
    return folder


def write_frog_dataset(root: Path, count: int = 4, repeats: int = 1) -> Path:
    """Write the DreamBooth folder ``{repeats}_frog``: ``count`` 64x64 images captioned "a frog, number i"."""
    write_captioned_images(root / f"{repeats}_frog", [f"a frog, number {i}" for i in range(count)])
    return root


def write_dataset_toml(path: Path, datasets: list[dict], general: dict | None = None) -> Path:
    """Write a ``--dataset_config`` file: an optional ``[general]`` table and one ``[[datasets]]`` entry per dict
    (subsets go under its ``subsets`` key); return ``path``."""
    document = ({} if general is None else {"general": general}) | {"datasets": datasets}
    path.write_text(toml.dumps(document))
    return path


def run_args(
    out: Path, *, name: str, learning_rate: str, seed: int, model: Path | str | None = None, resolution: bool = True
) -> list[str]:
    """The flags every training run here shares: model (when given), 64 px (unless a dataset TOML sets it), output
    folder and name, learning rate, AdamW and the seed."""
    model_args = [] if model is None else ["--pretrained_model_name_or_path", str(model)]
    resolution_args = ["--resolution", "64"] if resolution else []
    return [
        *model_args,
        *resolution_args,
        "--output_dir",
        str(out),
        "--output_name",
        name,
        "--learning_rate",
        learning_rate,
        "--optimizer_type",
        "AdamW",
        "--seed",
        str(seed),
    ]


def network_args(model: Path | str, data: Path | None, out: Path, *extra: str, name: str = "lora") -> list[str]:
    """A train_network.py run: a rank-4, alpha-2 LoRA at learning rate 1e-2 and seed 3 on ``data`` with .txt
    captions (no --train_data_dir and no --resolution when ``data`` is None: a dataset TOML gives them), then
    ``extra``."""
    dataset = [] if data is None else ["--train_data_dir", str(data)]
    base = run_args(out, name=name, learning_rate="1e-2", seed=3, model=model, resolution=data is not None)
    network = ["--caption_extension", ".txt", "--network_dim", "4", "--network_alpha", "2"]
    return [*base, *dataset, *network, *extra]


def model_weights(path: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet, text encoder and VAE state dicts of the model saved at ``path``."""
    c = load_model(path)
    return {name: dict(getattr(c, name).state_dict()) for name in ("unet", "text_encoder", "vae")}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts have the same keys and bitwise equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
