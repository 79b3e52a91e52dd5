"""SDXL textual-inversion files: ``clip_l`` and ``clip_g`` in one file, as sd-scripts writes and A1111/ComfyUI read."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library import textual_inversion as ti
from library.errors import UserError
from tests.test_sdxl_lora import tiny_sdxl


def sdxl_vectors(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 768, generator=g), torch.randn(n, 1280, generator=g)


@pytest.mark.parametrize("name", ["emb.safetensors", "emb.pt"])
def test_sdxl_embedding_round_trip_is_exact(tmp_path, name):
    clip_l, clip_g = sdxl_vectors()
    path = tmp_path / name
    ti.save_sdxl_embedding(path, [clip_l, clip_g], None, {"ss_sd_model_name": "sdxl"})
    back = ti.load_sdxl_embedding(path, widths=(768, 1280))
    assert torch.equal(back[0], clip_l) and torch.equal(back[1], clip_g)


def test_sdxl_embedding_file_layout_is_sd_scripts(tmp_path):
    """Exactly two tensors, ``clip_l`` (N, 768) and ``clip_g`` (N, 1280), in the save dtype, with the metadata."""
    clip_l, clip_g = sdxl_vectors(2)
    path = tmp_path / "emb.safetensors"
    ti.save_sdxl_embedding(path, [clip_l, clip_g], torch.bfloat16, {"ss_output_name": "emb"})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.metadata() == {"ss_output_name": "emb"}
        got_l, got_g = f.get_tensor("clip_l"), f.get_tensor("clip_g")
    assert got_l.dtype == got_g.dtype == torch.bfloat16
    assert torch.equal(got_l, clip_l.to(torch.bfloat16)) and torch.equal(got_g, clip_g.to(torch.bfloat16))


def test_wrong_files_are_refused_with_one_line(tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(sd1))
    with pytest.raises(
        UserError, match=r"sd1\.safetensors: holds an SD 1\.x/2\.x embedding \(emb_params\), not an SDXL"
    ):
        ti.load_sdxl_embedding(sd1)
    clip_l, clip_g = sdxl_vectors()
    sdxl = tmp_path / "sdxl.safetensors"
    ti.save_sdxl_embedding(sdxl, [clip_l, clip_g], None, None)
    with pytest.raises(UserError, match="an SDXL embedding"):
        ti.load_embedding(sdxl)
    with pytest.raises(UserError, match="clip_g vectors are 1280 wide but the text encoder's are 1024"):
        ti.load_sdxl_embedding(sdxl, widths=(768, 1024))
    half = tmp_path / "half.safetensors"
    save_file({"clip_l": clip_l}, str(half))
    with pytest.raises(UserError, match="no clip_g tensor"):
        ti.load_sdxl_embedding(half)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g[:2].contiguous()}, str(uneven))
    with pytest.raises(UserError, match="clip_l has 3 vectors but clip_g 2"):
        ti.load_sdxl_embedding(uneven)
    with pytest.raises(ValueError, match="same number of vectors"):
        ti.save_sdxl_embedding(tmp_path / "x.safetensors", [clip_l, clip_g[:1]], None, None)


def test_diffusers_loads_each_half_into_its_encoder(tmp_path):
    """diffusers' documented SDXL route (one ``load_textual_inversion`` per encoder, from the file's two tensors)
    puts our vectors into both token embeddings unchanged."""
    c = tiny_sdxl()
    te1, te2 = c.text_encoders
    clip_l, clip_g = torch.randn(2, te1.config.hidden_size), torch.randn(2, te2.config.hidden_size)
    path = tmp_path / "emb.safetensors"
    ti.save_sdxl_embedding(path, [clip_l, clip_g], None, None)
    pipe = c.to_pipeline()
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    loaded = ti.load_sdxl_embedding(path, widths=(te1.config.hidden_size, te2.config.hidden_size))
    pipe.load_textual_inversion(loaded[0], token=["xqzlor", "xqzlor1"], text_encoder=te1, tokenizer=tok1)
    pipe.load_textual_inversion(loaded[1], token=["xqzlor", "xqzlor1"], text_encoder=te2, tokenizer=tok2)
    for tok, te, want in ((tok1, te1, clip_l), (tok2, te2, clip_g)):
        ids = tok.convert_tokens_to_ids(["xqzlor", "xqzlor1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], want)
