"""Our LoRA files in other tools (diffusers' load_lora_weights) and LyCORIS behind the same network interface."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from library.models.tiny import make_tiny_model
from networks import lora


def trained_like_network(components, **kwargs) -> lora.LoRANetwork:
    """A network with random non-zero up weights, so applying it changes the outputs."""
    net = lora.create_network(1.0, 4, 2.0, components.vae, components.text_encoder, components.unet, **kwargs)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in net.text_encoder_loras + net.unet_loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    return net


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_diffusers_load_lora_weights_matches_our_apply(tmp_path):
    """conv_dim makes the file hold every kind of key we write: Linear, 1x1 and 3x3 conv, text encoder."""
    ours, theirs = make_tiny_model(), make_tiny_model()
    net = trained_like_network(ours, conv_dim="2", conv_alpha="1")
    net.save_weights(tmp_path / "lora.safetensors", None, {"ss_network_module": "networks.lora"})
    net.apply_to(ours.text_encoder, ours.unet)
    net.eval()

    pipe = theirs.to_pipeline()
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(records)
            lg.setLevel(level)
    complaints = records.messages + [str(w.message) for w in caught]
    assert not [m for m in complaints if "key" in m.lower() or "lora" in m.lower()], complaints

    # every module of our file became a PEFT LoRA layer: nothing was dropped in conversion
    n_unet = sum(1 for _, m in theirs.unet.named_modules() if hasattr(m, "lora_A"))
    n_te = sum(1 for _, m in theirs.text_encoder.named_modules() if hasattr(m, "lora_A"))
    assert (n_unet, n_te) == (len(net.unet_loras), len(net.text_encoder_loras))

    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    with torch.no_grad():
        out_ours, out_theirs = ours.unet(x, t, ctx).sample, theirs.unet(x, t, ctx).sample
        te_ours, te_theirs = ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0]
        base = make_tiny_model().unet(x, t, ctx).sample
    assert (out_ours - base).abs().max() > 1e-2  # the LoRA has an effect
    torch.testing.assert_close(out_theirs, out_ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(te_theirs, te_ours, rtol=1e-4, atol=1e-5)


@pytest.fixture
def lycoris_kohya():
    """lycoris.kohya, with its class-level preset settings restored afterwards (apply_preset changes them)."""
    import lycoris.kohya as kohya

    cls = kohya.LycorisNetworkKohya
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}
    yield kohya
    for k, v in saved.items():
        setattr(cls, k, v)


def test_lycoris_loha_attn_mlp_trains_through_the_network_interface(lycoris_kohya, tmp_path):
    c = make_tiny_model()
    net = lycoris_kohya.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet, algo="loha", preset="attn-mlp")
    assert len(net.text_encoder_loras) == 24 and len(net.unet_loras) >= 192
    net.apply_to(c.text_encoder, c.unet, True, True)
    params, _ = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    net.prepare_grad_etc(c.text_encoder, c.unet)
    net.on_epoch_start(c.text_encoder, c.unet)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32)
    loss = c.unet(x, t, ctx).sample.square().mean()
    loss.backward()
    grads = [p.grad for group in params for p in group["params"] if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    net.save_weights(str(tmp_path / "loha.safetensors"), None, {})
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "loha.safetensors").keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a" in keys


def test_lycoris_default_preset_fails_on_diffusers_unet(lycoris_kohya):
    """Known upstream bug (lycoris-lora 4.1.3): its default targets match time_embedding twice on a diffusers UNet.

    When this test fails, LyCORIS has fixed it and the default preset can be recommended again.
    """
    c = make_tiny_model()
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        lycoris_kohya.create_network(1.0, 4, 1.0, c.vae, c.text_encoder, c.unet)
