"""LoRA files between us and diffusers, both ways: ours in ``load_lora_weights`` (LoCon, DoRA, LoHa/LoKr refused)
and diffusers' own ``save_lora_weights`` files (PEFT/diffusers key layouts, alphas from the PEFT config header) in
``networks.lora``, the lora_family tools and gen_img's loader. Plain LoRA + conv: tests/test_lora_compat.py."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.lora_family import delta_weight, model_layers, parse_modules, read_lora_file
from library.lora_family.diffusers_keys import to_sd_scripts
from library.models.tiny import make_tiny_model, tiny_model  # noqa: F401
from networks import lora

G = torch.Generator().manual_seed(5)
X, T, CTX = torch.randn(2, 4, 8, 8, generator=G), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=G)
IDS = torch.randint(0, 49407, (2, 77), generator=G)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 on CPU; PEFT and we sum the same products in another order


def outputs(c) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return c.unet(X, T, CTX).sample, c.text_encoder(IDS)[0]


def our_file(path, seed: int = 11, **kwargs) -> None:
    """A networks.lora file with every zero-initialised weight made random, so every module changes the model."""
    c = make_tiny_model()
    net = lora.create_network(1.0, 4, 2.0, c.vae, c.text_encoder, c.unet, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.02 if "dora_scale" in name else 0.1))
    net.save_weights(path, None, {"ss_network_module": "networks.lora"})


def ours_applied(path) -> tuple[torch.Tensor, torch.Tensor]:
    c = make_tiny_model()
    net, weights = lora.create_network_from_weights(1.0, str(path), c.vae, c.text_encoder, c.unet)
    net.apply_to(c.text_encoder, c.unet)
    info = net.load_state_dict(weights, strict=False)
    assert not info.unexpected_keys and not info.missing_keys
    net.eval()
    return outputs(c)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def diffusers_applied(path) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    """Outputs of a fresh tiny model after ``pipe.load_lora_weights(path)``, and the warnings diffusers logged."""
    c = make_tiny_model()
    records = Records()
    log = logging.getLogger("diffusers")
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.WARNING)
    try:
        c.to_pipeline().load_lora_weights(str(path.parent), weight_name=path.name)
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    return outputs(c), records.messages


def test_locon_matches_diffusers(tmp_path):
    """networks.lora algo=locon with conv_dim: the same keys as LoRA + 3x3 conv pairs; diffusers applies it."""
    path = tmp_path / "locon.safetensors"
    our_file(path, algo="locon", conv_dim="2", conv_alpha="1")
    (unet, te), warnings = diffusers_applied(path)
    ours = ours_applied(path)
    base = outputs(make_tiny_model())
    assert (ours[0] - base[0]).abs().max() > 1e-2 and (ours[1] - base[1]).abs().max() > 1e-2
    torch.testing.assert_close(unet, ours[0], **TOL)
    torch.testing.assert_close(te, ours[1], **TOL)
    assert not [m for m in warnings if "lora" in m.lower()], warnings


def test_dora_loses_its_magnitude_in_diffusers(tmp_path):
    """diffusers 0.42 drops dora_scale with a warning and applies the rest as plain LoRA: its outputs equal our
    merge of the same file without dora_scale, and differ from the DoRA the file describes."""
    path, plain = tmp_path / "dora.safetensors", tmp_path / "plain.safetensors"
    our_file(path, dora_wd="true")
    sd = load_file(str(path))
    assert sum(k.endswith(".dora_scale") for k in sd) > 0
    save_file({k: v for k, v in sd.items() if not k.endswith(".dora_scale")}, str(plain))
    (unet, te), warnings = diffusers_applied(path)
    assert any("dora_scale" in m and "filter out" in m for m in warnings), warnings
    without = ours_applied(plain)
    torch.testing.assert_close(unet, without[0], **TOL)
    torch.testing.assert_close(te, without[1], **TOL)
    dora = ours_applied(path)
    assert (dora[0] - unet).abs().max() > 1e-3


REFUSED = {
    "loha": ({"algo": "loha"}, ".hada_w1_a"),
    "lokr": ({"algo": "lokr"}, ".lokr_w1"),
    "full": ({"algo": "full"}, ".diff"),
    "locon-tucker": ({"algo": "locon", "conv_dim": "2", "conv_alpha": "1", "use_tucker": "true"}, ".lora_mid.weight"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_diffusers_refuses_loha_lokr_full_and_tucker(tmp_path, name):
    """diffusers 0.42's kohya converter leaves hada_*/lokr_*/diff/lora_mid keys unrenamed and refuses the file."""
    kwargs, key = REFUSED[name]
    path = tmp_path / f"{name}.safetensors"
    our_file(path, **kwargs)
    with pytest.raises(ValueError, match="^The following keys have not been correctly renamed") as e:
        diffusers_applied(path)
    assert key in str(e.value)


def test_diffusers_refuses_sd_scripts_oft(tmp_path):
    from networks import oft

    c = make_tiny_model()
    net = oft.create_network(1.0, 4, 1e-3, c.vae, c.text_encoder, c.unet)
    net.save_weights(tmp_path / "oft.safetensors", None, {})
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'`"):
        diffusers_applied(tmp_path / "oft.safetensors")


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut"]


@pytest.fixture(scope="module")
def diffusers_file(tmp_path_factory):
    """A LoRA saved by ``StableDiffusionPipeline.save_lora_weights`` as diffusers' training scripts do (PEFT state
    dicts through ``convert_state_dict_to_diffusers``, PEFT configs in the header): alpha != rank, an alpha_pattern,
    rsLoRA on the text encoder, Linear, 1x1 and 3x3 conv layers, random weights."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("diffusers_lora")
    c = make_tiny_model()
    unet_cfg = LoraConfig(
        r=4, lora_alpha=8, alpha_pattern={"to_v": 2}, init_lora_weights=False, target_modules=UNET_TARGETS
    )
    te_cfg = LoraConfig(r=2, lora_alpha=3, use_rslora=True, init_lora_weights=False, target_modules=["q_proj", "fc1"])
    torch.manual_seed(3)
    c.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, c.text_encoder)  # transformers 5's add_adapter wants peft >= 0.22
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(c.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(c.text_encoder)),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors", outputs(c)


def test_diffusers_file_holds_the_layouts_we_read(diffusers_file):
    keys = list(load_file(str(diffusers_file[0])))
    assert any(k.endswith(".to_q.lora.down.weight") for k in keys)  # diffusers' LoRACompatible spelling
    assert any(k.endswith(".conv1.lora_A.weight") for k in keys)  # PEFT spelling
    assert any(k.startswith("text_encoder.encoder.layers.0.") for k in keys)  # transformers 5: no text_model
    assert any(".lora_linear_layer.up.weight" in k for k in keys)


def test_diffusers_saved_lora_in_ours_equals_the_peft_model(diffusers_file):
    path, reference = diffusers_file
    base = outputs(make_tiny_model())
    assert (reference[0] - base[0]).abs().max() > 1e-2 and (reference[1] - base[1]).abs().max() > 1e-2
    ours = ours_applied(path)
    torch.testing.assert_close(ours[0], reference[0], **TOL)
    torch.testing.assert_close(ours[1], reference[1], **TOL)
    # the names and alphas we read: standard text_model names, alpha from lora_alpha / alpha_pattern / rsLoRA
    sd = lora.load_lora_state_dict(path)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert sd[f"{attn}_to_q.alpha"].item() == 8.0 and sd[f"{attn}_to_v.alpha"].item() == 2.0
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == pytest.approx(3 * 2**0.5)


def test_diffusers_drops_attention_loras_of_its_own_mixed_layout_file(diffusers_file):
    """diffusers 0.42 quirk: its own save (convert_state_dict_to_diffusers) spells attention layers ``lora.down``
    and other layers ``lora_A``; load_lora_weights converts only when the first key is not PEFT-spelled, so the
    attention LoRAs are left out (PEFT warns about "additional target modules") and the UNet differs."""
    path, reference = diffusers_file
    with pytest.warns(RuntimeWarning, match="PEFT config contained these additional target modules"):
        (unet, te), _ = diffusers_applied(path)
    assert (unet - reference[0]).abs().max() > 1e-2
    torch.testing.assert_close(te, reference[1], **TOL)


def test_one_layout_file_matches_diffusers(diffusers_file, tmp_path):
    """Attention-only (the usual diffusers target set) in one layout: diffusers' load_lora_weights and ours agree."""
    path = tmp_path / "attn.safetensors"
    with safe_open(str(diffusers_file[0]), "pt") as f:
        header = f.metadata()
    sd = {k: v for k, v in load_file(str(diffusers_file[0])).items() if ".lora." in k or k.startswith("text_")}
    save_file(sd, str(path), header)
    (unet, te), _ = diffusers_applied(path)
    assert (unet - outputs(make_tiny_model())[0]).abs().max() > 1e-2
    ours = ours_applied(path)
    torch.testing.assert_close(ours[0], unet, **TOL)
    torch.testing.assert_close(ours[1], te, **TOL)


def test_diffusers_saved_lora_in_the_lora_family_tools(diffusers_file):
    """read_lora_file (what merge/resize/svd-merge read through) renames the file and takes the alphas from the
    header's PEFT config: merging every module gives the PEFT model's outputs."""
    path, (unet, te) = diffusers_file
    f = read_lora_file(path)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert f.tensors[f"{attn}_to_q.alpha"].item() == 8.0 and f.tensors[f"{attn}_to_v.alpha"].item() == 2.0
    modules = parse_modules(f.tensors, str(path))
    c = make_tiny_model()
    layers = model_layers(c)
    with torch.no_grad():
        for name, module in modules.items():
            layer = layers[name]
            layer.weight.add_(delta_weight(module, shape=layer.weight.shape))
    merged = outputs(c)
    torch.testing.assert_close(merged[0], unet, **TOL)
    torch.testing.assert_close(merged[1], te, **TOL)


def test_without_header_alpha_is_rank_as_in_diffusers(diffusers_file, tmp_path):
    """A file with no config header: diffusers and we both use alpha = rank (scale 1)."""
    path = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in load_file(str(diffusers_file[0])).items() if ".lora." in k}, str(path))
    (unet, te), _ = diffusers_applied(path)
    ours = ours_applied(path)
    torch.testing.assert_close(ours[0], unet, **TOL)
    torch.testing.assert_close(ours[1], te, **TOL)
    assert {v.item() for k, v in lora.load_lora_state_dict(path).items() if k.endswith(".alpha")} == {4.0}


def test_old_attention_processor_layout(diffusers_file, tmp_path):
    """diffusers 0.42 still reads ``….attn1.processor.to_q_lora.down.weight`` (attention-processor LoRA); so do we."""
    import re

    old = {}
    for key, value in load_file(str(diffusers_file[0])).items():
        m = re.match(r"(unet\..*attn\d)\.(to_q|to_k|to_v|to_out)(?:\.0)?\.lora\.(down|up)\.weight$", key)
        if m:
            old[f"{m[1]}.processor.{m[2]}_lora.{m[3]}.weight"] = value
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    (unet, _), _ = diffusers_applied(path)
    assert (unet - outputs(make_tiny_model())[0]).abs().max() > 1e-2
    torch.testing.assert_close(ours_applied(path)[0], unet, **TOL)


def test_unknown_diffusers_keys_are_one_line(tmp_path):
    sd = {"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(UserError, match="x.safetensors: 'unet.*lora_magnitude_vector'.*PEFT DoRA"):
        to_sd_scripts(sd, None, "x.safetensors")
    with pytest.raises(
        UserError, match=r"x.safetensors: unknown key layout \(e.g. 'unet.a.b.lora_A.weight'\): .*no lora_B"
    ):
        to_sd_scripts({"unet.a.b.lora_A.weight": torch.ones(2, 3)}, None, "x.safetensors")
    bad_header = {"lora_adapter_metadata": "{not json"}
    with pytest.raises(UserError, match="lora_adapter_metadata header is not valid JSON"):
        to_sd_scripts({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.ones(3, 2)}, bad_header)


def test_sdxl_diffusers_lora_reads_with_two_text_encoders(tmp_path):
    """StableDiffusionXLPipeline.save_lora_weights (UNet + both text encoders): each module's ΔW as we read it
    equals PEFT's own ``get_delta_weight``; networks.lora builds and loads every module (SGM names, lora_te1/2)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from library.lora_family import check_modules
    from library.models.family import family_named

    adapted, fresh = tiny_model(family_named("sdxl")), tiny_model(family_named("sdxl"))
    configs = [
        LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "out_proj"]),
        LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_modules=["fc1", "fc2"]),
    ]
    torch.manual_seed(4)
    adapted.unet.add_adapter(configs[0])
    for cfg, te in zip(configs[1:], adapted.text_encoders):
        inject_adapter_in_model(cfg, te)
    layers = [
        convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) for m in (adapted.unet, *adapted.text_encoders)
    ]
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=layers[0],
        text_encoder_lora_layers=layers[1],
        text_encoder_2_lora_layers=layers[2],
        unet_lora_adapter_metadata=configs[0].to_dict(),
        text_encoder_lora_adapter_metadata=configs[1].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs[2].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    f = read_lora_file(path)
    modules = parse_modules(f.tensors, str(path), f.metadata)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for n in modules)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for n in modules)
    found = check_modules(modules, fresh, str(path), f.metadata)
    where = {}
    for root, model in (("unet", fresh.unet), ("te1", fresh.text_encoders[0]), ("te2", fresh.text_encoders[1])):
        where.update({id(m): (root, p) for p, m in model.named_modules()})
    roots = {"unet": adapted.unet, "te1": adapted.text_encoders[0], "te2": adapted.text_encoders[1]}
    for name, module in modules.items():
        root, p = where[id(found[name])]
        peft_layer = roots[root].get_submodule(p)
        expected = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(delta_weight(module, shape=expected.shape), expected, rtol=1e-5, atol=1e-7)
    assert len(modules) == sum(
        1 for m in layers for k in m if k.endswith(("lora.down.weight", "lora_A.weight", "down.weight"))
    )

    ours = tiny_model(family_named("sdxl"))
    net, _ = lora.create_network_from_weights(1.0, str(path), ours.vae, ours.text_encoders, ours.unet)
    net.apply_to(ours.text_encoders, ours.unet)
    info = net.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(modules)
