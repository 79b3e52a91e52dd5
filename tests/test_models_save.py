"""Saving in every format and precision, round trips, diffusers' own reader, and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from library.errors import UserError
from library.models.detect import CONFIG_KEY, clean_config, text_config_dict
from library.models.load import load_model
from library.models.save import save_model
from library.models.tiny import make_tiny_model

DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _same(a, b, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}.{k}"


def _same_model(a, b) -> None:
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(a, part), getattr(b, part), part)


@pytest.mark.parametrize("precision", [None, "float", "fp16", "bf16"])
def test_single_files_hold_tensors_of_the_requested_precision(sd1, tmp_path, precision):
    expected = DTYPES[precision]
    save_model(sd1, tmp_path / "m.safetensors", "safetensors", precision, metadata={"ss_note": "x"})
    tensors, metadata = _safetensors(tmp_path / "m.safetensors")
    assert {t.dtype for t in tensors.values()} == {expected}
    assert metadata["ss_note"] == "x" and json.loads(metadata[CONFIG_KEY])["prediction_type"] == "epsilon"
    assert len([k for k in tensors if k.startswith("model.diffusion_model.")]) == len(sd1.unet.state_dict())
    save_model(sd1, tmp_path / "m.ckpt", "ckpt", precision, epoch=3, global_step=42)
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert sorted(ckpt) == sorted(["state_dict", "epoch", "global_step", CONFIG_KEY])
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 42)
    assert sorted(ckpt["state_dict"]) == sorted(tensors)
    assert {t.dtype for t in ckpt["state_dict"].values()} == {expected}
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ckpt["state_dict"][key], sd1.unet.down_blocks[0].resnets[0].conv1.weight.to(expected))


@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_diffusers_folders_hold_tensors_of_the_requested_precision(sd1, tmp_path, precision):
    expected = DTYPES[precision]
    save_model(sd1, tmp_path / "st", "diffusers_safetensors", precision)
    save_model(sd1, tmp_path / "pt", "diffusers", precision)
    index = json.loads((tmp_path / "st" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for part, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        tensors, _ = _safetensors(tmp_path / "st" / part / f"{stem}.safetensors")
        assert {t.dtype for t in tensors.values()} == {expected}, part
        binary = "pytorch_model.bin" if stem == "model" else f"{stem}.bin"
        assert not list((tmp_path / "pt" / part).glob("*.safetensors"))
        loaded = torch.load(tmp_path / "pt" / part / binary, weights_only=True)
        assert sorted(loaded) == sorted(tensors) and {t.dtype for t in loaded.values()} == {expected}, part
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in tensors  # names every transformers version reads
    back = load_model(tmp_path / "pt")
    assert torch.equal(back.unet.conv_in.weight, sd1.unet.conv_in.weight.to(expected).float())
    assert sd1.unet.conv_in.weight.dtype == torch.float32  # saving never changes the model in memory


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_diffusers_to_single_file_to_diffusers_is_bit_identical(tmp_path, v2):
    model = make_tiny_model(v2=v2)
    save_model(model, tmp_path / "start", "diffusers_safetensors")
    start = load_model(tmp_path / "start")
    for ext in ("safetensors", "ckpt"):
        save_model(start, tmp_path / f"single.{ext}", ext)
        single = load_model(tmp_path / f"single.{ext}")
        save_model(single, tmp_path / f"end-{ext}", "diffusers")
        end = load_model(tmp_path / f"end-{ext}")
        _same_model(model, end)
        assert (end.family.v2, end.v_parameterization) == (v2, v2)
        assert clean_config(end.unet.config) == clean_config(model.unet.config)
        assert clean_config(end.vae.config) == clean_config(model.vae.config)
        assert text_config_dict(end.text_encoder.config) == text_config_dict(model.text_encoder.config)


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_diffusers_from_single_file_reads_our_files(tmp_path, v2):
    model = make_tiny_model(v2=v2)
    save_model(model, tmp_path / "config", "diffusers_safetensors")
    save_model(model, tmp_path / "model.safetensors", "safetensors")
    pipe = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tmp_path / "config"), local_files_only=True
    )
    _same_model(model, pipe)


def test_diffusers_from_pretrained_reads_our_folder(tmp_path):
    model = make_tiny_model(v2=True)
    save_model(model, tmp_path / "sd2", "diffusers_safetensors", "fp16")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token_id == 0
    for part in ("unet", "vae", "text_encoder"):
        ours = {k: v.half() for k, v in getattr(model, part).state_dict().items()}
        theirs = getattr(pipe, part).state_dict()
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_sd2_single_file_has_the_standard_openclip_layout(tmp_path):
    model = make_tiny_model(v2=True)
    save_model(model, tmp_path / "m.safetensors", "safetensors")
    tensors, _ = _safetensors(tmp_path / "m.safetensors")
    p = "cond_stage_model.model."
    assert {k.split(".")[4] for k in tensors if k.startswith(p + "transformer.resblocks.")} == set("01234")
    assert tensors[p + "text_projection"].shape == (32, 32) and p + "logit_scale" in tensors
    assert not any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    assert tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2


def test_a_failed_single_file_write_leaves_the_old_file(sd1, tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"previous model")

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(sd1, path, "ckpt")
    assert path.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]
    with pytest.raises(OSError, match="disk full"):
        save_model(sd1, tmp_path / "new.ckpt", "ckpt")
    assert not (tmp_path / "new.ckpt").exists()


def test_a_failed_diffusers_write_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    model = make_tiny_model()

    class BrokenScheduler(DDPMScheduler):
        def save_pretrained(self, *args, **kwargs):
            raise RuntimeError("interrupted")

    model.scheduler = BrokenScheduler.from_config(model.scheduler.config)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_model(model, tmp_path / "out", "diffusers_safetensors")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model_index.json").write_text("{}")
    with pytest.raises(RuntimeError, match="interrupted"):
        save_model(model, tmp_path / "old", "diffusers")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["model_index.json"]


def test_bad_save_arguments_are_user_errors(sd1, tmp_path):
    with pytest.raises(UserError, match=r"--save_model_as: unknown format 'pth'"):
        save_model(sd1, tmp_path / "m.pth", "pth")
    with pytest.raises(UserError, match=r"--save_precision: unknown value 'fp8'"):
        save_model(sd1, tmp_path / "m.safetensors", "safetensors", "fp8")
    assert list(tmp_path.iterdir()) == []
