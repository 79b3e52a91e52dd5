"""train_textual_inversion.py and _XTI end to end on the tiny model, with real image files and real loaders."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_textual_inversion
import train_textual_inversion_XTI
from library.config.config_file import parse_args_with_config
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.io import load_safetensors
from library.models.tiny import make_tiny_model
from library.recipes.settings import TextualInversionSettings
from library.recipes.textual_inversion import TextualInversionRecipe
from library.textual_inversion import XTI_LAYERS, load_embedding
from library.xti import install_layer_conditioning
from tests.conftest import REPO
from tests.images import write_image
from tests.test_train_db import run_docs_example
from tests.training import write_captioned_images, write_dataset_toml

TOKEN = "mytok"
CAPTION = "a photo of mytok"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_captioned_images(root / "2_obj", [CAPTION] * 3)
    return root


def argv(data_dir: Path | None, out: Path, *extra: str) -> list[str]:
    data = [] if data_dir is None else ["--train_data_dir", str(data_dir)]
    return [
        "--pretrained_model_name_or_path",
        "tiny-sd1",
        *data,
        "--caption_extension",
        ".txt",
        "--resolution",
        "64",
        "--output_dir",
        str(out),
        "--token_string",
        TOKEN,
        "--init_word",
        "frog",
        "--optimizer_type",
        "AdamW",
        "--seed",
        "3",
        *extra,
    ]


def run(args: list[str], xti: bool = False) -> TextualInversionRecipe:
    return train_textual_inversion.run(parse_args_with_config(train_textual_inversion.setup_parser(), args), xti=xti)


MAIN = ("--num_vectors_per_token", "2", "--learning_rate", "5e-2", "--save_model_as", "safetensors")


@pytest.fixture(scope="module")
def main_run(data_dir, tmp_path_factory):
    """8 steps at a high learning rate, saving a model and a state every 4 steps."""
    out = tmp_path_factory.mktemp("main")
    recipe = run(argv(data_dir, out, *MAIN, "--max_train_steps", "8", "--save_every_n_steps", "4", "--save_state"))
    return out, recipe


def embedding_rows(path: Path) -> torch.Tensor:
    return load_safetensors(path)[0]["emb_params"]


def test_trains_only_the_new_rows_and_writes_sd_scripts_files(main_run):
    out, recipe = main_run
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "mytok-state",
        "mytok-step00000004-state",
        "mytok-step00000004.safetensors",
        "mytok-step00000008-state",
        "mytok-step00000008.safetensors",
        "mytok.safetensors",
        "mytok_report.txt",
    ]
    tensors, metadata = load_safetensors(out / "mytok.safetensors")
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 32)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    base = make_tiny_model().text_encoder.get_input_embeddings().weight
    trained = recipe.embedding.weight.detach()
    assert trained.shape == (49410, 32)
    assert torch.equal(trained[:49408], base)
    frog = base[11438]
    learned = trained[49408:]
    assert torch.equal(learned, tensors["emb_params"])
    assert all(not torch.equal(row, frog) for row in learned)
    assert not torch.equal(embedding_rows(out / "mytok-step00000004.safetensors"), learned)


def test_resume_from_the_middle_gives_the_same_embedding(main_run, data_dir, tmp_path):
    out, _ = main_run
    state = out / "mytok-step00000004-state"
    run(argv(data_dir, tmp_path, *MAIN, "--max_train_steps", "8", "--resume", str(state)))
    assert torch.equal(embedding_rows(tmp_path / "mytok.safetensors"), embedding_rows(out / "mytok.safetensors"))


def parsed(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return train_textual_inversion.setup_parser().parse_args(argv(tmp_path, tmp_path, *extra))


def recipe_for(tmp_path: Path, *extra: str, xti: bool = False) -> TextualInversionRecipe:
    return TextualInversionRecipe(settings_from_flags(TextualInversionSettings, parsed(tmp_path, *extra)), xti=xti)


def test_weights_flag_reads_our_files_and_a1111s_layout(main_run, tmp_path):
    out, _ = main_run
    learned = embedding_rows(out / "mytok.safetensors")
    torch.save({"emb_params": learned}, tmp_path / "ours.pt")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": learned}, "name": "x"}, tmp_path / "a1111.pt")
    for path in (out / "mytok.safetensors", tmp_path / "ours.pt", tmp_path / "a1111.pt"):
        assert torch.equal(load_embedding(path), learned)
        recipe = recipe_for(tmp_path, "--num_vectors_per_token", "2", "--weights", str(path))
        recipe.setup(make_tiny_model(), torch.device("cpu"), torch.float32)
        assert torch.equal(recipe.embedding.weight.detach()[49408:], learned)
    recipe = recipe_for(tmp_path, "--num_vectors_per_token", "3", "--weights", str(out / "mytok.safetensors"))
    with pytest.raises(UserError, match=r"--weights .*\(2, 32\), this run needs \(3, 32\)"):
        recipe.setup(make_tiny_model(), torch.device("cpu"), torch.float32)


def test_samples_during_training_see_the_expanded_token(main_run, tmp_path):
    from library.engine import SampleRequest
    from library.engine.wiring import parts_from_args, read_sample_settings
    from library.sampling import generate_image, line_to_prompt_dict, resolve_prompt

    out, _ = main_run
    options = " --d 7 --s 2 --w 64 --h 64"
    (tmp_path / "prompts.txt").write_text("a photo of mytok" + options + "\n")
    weights = str(out / "mytok.safetensors")
    prompts = str(tmp_path / "prompts.txt")
    args = parsed(tmp_path, "--num_vectors_per_token", "2", "--weights", weights, "--sample_prompts", prompts)
    args.output_name = "mytok"
    recipe = TextualInversionRecipe(settings_from_flags(TextualInversionSettings, args))
    c = make_tiny_model()
    recipe.setup(c, torch.device("cpu"), torch.float32)
    settings = read_sample_settings(args)
    sample = recipe.training_parts(parts_from_args(args, c), settings).sample
    sample(SampleRequest(components=c, step=3, epoch=None, output_dir=tmp_path, device=torch.device("cpu")))
    (written,) = (tmp_path / "sample").glob("mytok_000003_00_*_7.png")

    def render(text: str) -> np.ndarray:
        request = resolve_prompt(line_to_prompt_dict(text + options))
        return np.asarray(generate_image(c, request, settings, 7))

    assert np.array_equal(np.asarray(Image.open(written)), render("a photo of mytok mytok1"))
    assert not np.array_equal(render("a photo of mytok mytok1"), render("a photo of mytok"))


def test_diffusers_pipeline_loads_both_layouts(main_run, tmp_path):
    out, _ = main_run
    learned = embedding_rows(out / "mytok.safetensors")
    torch.save({"emb_params": learned}, tmp_path / "mytok.pt")
    for path in (out / "mytok.safetensors", tmp_path / "mytok.pt"):
        pipe = make_tiny_model().to_pipeline()
        pipe.load_textual_inversion(str(path), token="mytok")
        ids = pipe.tokenizer.convert_tokens_to_ids(["mytok", "mytok_1"])
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach()[ids], learned)
    image = pipe("a photo of mytok", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_dataset_toml_with_templates_and_pt_output(tmp_path):
    """Captions without the token train with --use_object_template (they are replaced); the default .pt layout."""
    image_dir = write_captioned_images(tmp_path / "images", ["a frog"] * 2).as_posix()
    toml = write_dataset_toml(tmp_path / "dataset.toml", [{"resolution": 64, "subsets": [{"image_dir": image_dir}]}])
    args = argv(None, tmp_path / "out", "--dataset_config", str(toml), "--use_object_template", "--output_name", "obj")
    recipe = run([*args, "--max_train_steps", "2", "--learning_rate", "1e-2"])
    saved = torch.load(tmp_path / "out" / "obj.pt", weights_only=True)
    assert list(saved) == ["emb_params"] and torch.equal(saved["emb_params"], recipe.embedding.weight[49408:])
    frog = make_tiny_model().text_encoder.get_input_embeddings().weight.detach()[11438]
    assert not torch.equal(saved["emb_params"][0], frog)


def test_captions_without_the_token_are_refused(tmp_path):
    write_image(tmp_path / "data" / "1_x" / "a.png")
    (tmp_path / "data" / "1_x" / "a.txt").write_text("a photo of a frog")
    with pytest.raises(UserError, match=r"--token_string 'mytok': no caption of the 1 training images contains it"):
        run(argv(tmp_path / "data", tmp_path / "out", "--max_train_steps", "1"))


def test_template_captions_are_fixed_by_seed_epoch_and_batch(data_dir):
    from library.config.dataset_config import dataset_flags
    from library.dataset.loader import build_train_dataset
    from library.recipes.textual_inversion import TemplateCaptions
    from library.textual_inversion import OBJECT_TEMPLATES

    args = train_textual_inversion.setup_parser().parse_args(argv(data_dir, data_dir / "unused"))
    source = TemplateCaptions(build_train_dataset(dataset_flags(args), {"dreambooth"}, seed=5), OBJECT_TEMPLATES, TOKEN)
    plan = source.batch_plan(1)
    first = [source.load_batch(p)["captions"][0] for p in plan]
    assert first == [source.load_batch(p)["captions"][0] for p in plan]
    assert all(c in [t.format(TOKEN) for t in OBJECT_TEMPLATES] for c in first)
    assert len(set(first)) > 1


def test_xti_gives_each_cross_attention_layer_its_own_conditioning():
    c = make_tiny_model()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    conds = torch.randn(16, 1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = c.unet(latents, t, conds[0]).sample
        install_layer_conditioning(c.unet)
        same = c.unet(latents, t, conds[0].repeat(1, 16, 1)).sample
        assert torch.allclose(same, plain, atol=1e-6)
        outputs = []
        for layer in range(16):
            stacked = conds[0].repeat(1, 16, 1)
            stacked[:, layer * 77 : (layer + 1) * 77] = conds[1]
            outputs.append(c.unet(latents, t, stacked).sample)
    for layer, output in enumerate(outputs):
        assert not torch.allclose(output, plain, atol=1e-6), XTI_LAYERS[layer]


def test_xti_trains_one_embedding_per_layer_and_reads_it_back(data_dir, tmp_path):
    recipe = run(
        argv(data_dir, tmp_path, "--max_train_steps", "2", "--learning_rate", "5e-2", "--save_model_as", "safetensors"),
        xti=True,
    )
    tensors, metadata = load_safetensors(tmp_path / "mytok.safetensors")
    assert list(tensors) == list(XTI_LAYERS) and metadata == {}
    assert all(t.shape == (1, 32) for t in tensors.values())
    frog = make_tiny_model().text_encoder.get_input_embeddings().weight.detach()[11438]
    assert len({tuple(t[0].tolist()) for t in tensors.values()}) == 16
    assert all(not torch.equal(t[0], frog) for t in tensors.values())
    assert torch.equal(
        recipe.embedding.weight.detach()[:49408], make_tiny_model().text_encoder.get_input_embeddings().weight
    )
    again = recipe_for(tmp_path, "--weights", str(tmp_path / "mytok.safetensors"), xti=True)
    again.setup(make_tiny_model(), torch.device("cpu"), torch.float32)
    assert all(torch.equal(again.embeddings()[k], tensors[k]) for k in XTI_LAYERS)


def test_xti_refuses_sd2(data_dir, tmp_path):
    with pytest.raises(UserError, match="--v2: train_textual_inversion_XTI.py supports SD 1.x only"):
        train_textual_inversion_XTI.main(argv(data_dir, tmp_path, "--v2"))


def test_docs_example_runs(tmp_path):
    text = (REPO / "docs" / "train_textual_inversion.md").read_text()
    assert "/tmp/ti-example" in re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    out = run_docs_example("train_textual_inversion.md", tmp_path)
    for name in ("sks-step00000002.safetensors", "sks-step00000004.safetensors", "sks.safetensors"):
        assert load_safetensors(out / name)[0]["emb_params"].shape == (2, 32)
    prompts = (REPO / "examples" / "sample_prompts.txt").read_text().splitlines()
    count = sum(1 for line in prompts if line.strip() and not line.lstrip().startswith("#"))
    assert len(list((out / "sample").glob("sks_000004_*.png"))) == count
    assert list(load_safetensors(out / "xti" / "sks.safetensors")[0]) == list(XTI_LAYERS)
    assert load_safetensors(out / "sks.safetensors")[1]["modelspec.title"] == "sks"
