"""The tiny model factory and packaged tokenizer behave like SD's."""

import time

import torch

from library.models.tiny import make_tiny_model
from library.text.tokenizer import load_packaged_tokenizer


def test_packaged_tokenizer_matches_clip_reference_ids():
    tok = load_packaged_tokenizer()
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77
    assert len(tok) == 49408


def test_sd2_tokenizer_pads_with_exclamation_mark():
    tok = load_packaged_tokenizer(v2=True)
    ids = tok("a photo", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 1125, 49407, 0]
    assert len(ids) == 77


def test_tiny_model_builds_fast_and_reproducibly():
    start = time.process_time()
    a = make_tiny_model(seed=3)
    # CPU time, not wall time, so a busy machine cannot fail it: about 0.2 s here; the whole suite builds it often
    assert time.process_time() - start < 1.0
    b = make_tiny_model(seed=3)
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.text_encoder.get_input_embeddings().weight.shape == (49408, 32)
    assert not a.family.v2 and a.prediction_type == "epsilon"


def test_tiny_sd2_is_v_prediction():
    c = make_tiny_model(v2=True)
    assert c.family.v2 and c.v_parameterization
    assert c.scheduler.config.prediction_type == "v_prediction"
    assert c.unet.config.use_linear_projection
