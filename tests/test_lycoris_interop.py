"""Our LoHa/LoKr/LoCon/DoRA/full files and lycoris-lora's, both ways, on the tiny SD1 model: the same file gives the
same model output in either package (within 1e-5; outputs are of order 1).

LyCORIS 4.1.3 under transformers 5 names text-encoder modules ``lora_te_encoder_layers_…`` (no ``text_model``), so
files we hand it have their text-encoder keys renamed to that spelling here; its files load in ours unchanged (we
accept both spellings). The UNet and the text encoder are both compared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.io import load_safetensors
from library.recipes import lycoris_compat
from networks import lora
from tests.test_network_types import build, forward, randomize

lycoris_kohya = pytest.importorskip("lycoris.kohya")


@pytest.fixture(scope="module")
def sd1():
    from library.models.tiny import make_tiny_model

    return make_tiny_model()


def lycoris_spelling(path: Path, out: Path) -> Path:
    """The file with text-encoder keys as LyCORIS under transformers 5 writes and matches them."""
    tensors = load_safetensors(path)[0]
    save_file({k.replace("lora_te_text_model_", "lora_te_"): v.contiguous() for k, v in tensors.items()}, out)
    return out


@pytest.mark.parametrize("name", ["loha-tucker-dora", "lokr", "lokr-decompose-both", "locon-dora", "full"])
def test_our_files_give_the_same_output_in_lycoris(sd1, name, tmp_path):
    te, unet, net = build(sd1, name)
    randomize(net)
    net.apply_to(te, unet)
    net.eval()
    ours = forward(sd1, te, unet)
    net.save_weights(tmp_path / "ours.safetensors", None, {})
    file = lycoris_spelling(tmp_path / "ours.safetensors", tmp_path / "for_lycoris.safetensors")
    te2, unet2 = copy.deepcopy(sd1.text_encoder), copy.deepcopy(sd1.unet)
    theirs, _ = lycoris_compat.create_network_from_weights(lycoris_kohya, 1.0, str(file), None, te2, unet2)
    assert len(theirs.unet_loras) == len(net.unet_loras) and len(theirs.text_encoder_loras) == len(
        net.text_encoder_loras
    )
    theirs.apply_to(te2, unet2, True, True)
    theirs.eval()
    torch.testing.assert_close(forward(sd1, te2, unet2), ours, atol=1e-5, rtol=0)


LYCORIS_ALGOS = {
    "loha": {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"},
    "lokr": {"algo": "lokr", "factor": "4", "conv_dim": "2", "conv_alpha": "1"},
    "locon-dora": {"algo": "locon", "dora_wd": "true"},
}


@pytest.mark.parametrize("name", sorted(LYCORIS_ALGOS))
def test_lycoris_files_give_the_same_output_in_ours(sd1, name, tmp_path):
    """A network built by lycoris.kohya (preset attn-mlp), random non-zero weights, saved by LyCORIS."""
    te, unet = copy.deepcopy(sd1.text_encoder), copy.deepcopy(sd1.unet)
    options = LYCORIS_ALGOS[name] | {"preset": "attn-mlp"}
    theirs = lycoris_compat.create_network(lycoris_kohya, 1.0, 4, 2, None, te, unet, **options)
    randomize(theirs)
    theirs.apply_to(te, unet, True, True)
    theirs.eval()
    expected = forward(sd1, te, unet)
    theirs.save_weights(str(tmp_path / "theirs.safetensors"), None, {})
    tensors = load_safetensors(tmp_path / "theirs.safetensors")[0]
    assert any(k.startswith("lora_te_encoder_layers_") for k in tensors)  # LyCORIS's spelling, see the docstring
    te2, unet2 = copy.deepcopy(sd1.text_encoder), copy.deepcopy(sd1.unet)
    ours, _ = lora.create_network_from_weights(1.0, str(tmp_path / "theirs.safetensors"), None, te2, unet2)
    ours.apply_to(te2, unet2)
    ours.load_weights(tmp_path / "theirs.safetensors")
    ours.eval()
    assert len(ours.loras) == len({k.split(".")[0] for k in tensors})
    torch.testing.assert_close(forward(sd1, te2, unet2), expected, atol=1e-5, rtol=0)
