"""sdxl_train_textual_inversion.py end to end on the tiny SDXL model saved as a diffusers folder, with real image
files: one token trained in both text encoders, saved as sd-scripts' ``clip_l``/``clip_g`` file, read back with
--weights, resumed step-exactly, used in samples; the other family's model is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl_train_textual_inversion
import train_textual_inversion
from library.cli import run_cli
from library.config.settings import settings_from_flags
from library.errors import UserError
from library.io import load_safetensors
from library.models.components import Components
from library.models.family import family_named, size_batch
from library.models.tiny import tiny_model
from library.recipes.settings import TextualInversionSettings
from library.recipes.textual_inversion import TextualInversionRecipe
from library.text.encode import TextEncodingSettings
from library.textual_inversion import add_tokens_to_all
from tests.training import run_args, write_captioned_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "mytok"
SAMPLE = " --w 64 --h 64 --s 2 --d 7"


def tiny_sdxl() -> Components:
    return tiny_model(family_named("sdxl"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_captioned_images(root / "2_obj", [f"a photo of {TOKEN}"] * 3)
    return root


def argv(model: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    base = run_args(out, name=TOKEN, learning_rate="5e-2", seed=3, model=model)
    ti = ["--train_data_dir", str(data), "--caption_extension", ".txt", "--token_string", TOKEN, "--init_word", "frog"]
    return [*base, *ti, "--num_vectors_per_token", "2", *extra]


FOUR_STEPS = ("--max_train_steps", "4", "--save_model_as", "safetensors")


@pytest.fixture(scope="module")
def straight(sdxl_dir, data_dir, tmp_path_factory) -> Path:
    """Four steps, a model file and a state every 2 steps, and a sample after step 4."""
    out = tmp_path_factory.mktemp("straight")
    prompts = out.parent / "prompts.txt"
    prompts.write_text(f"a photo of {TOKEN}{SAMPLE}\n")
    extra = ["--save_every_n_steps", "2", "--save_state", "--sample_prompts", str(prompts)]
    sdxl_train_textual_inversion.main(argv(sdxl_dir, data_dir, out, *FOUR_STEPS, *extra, "--sample_every_n_steps", "4"))
    return out


def new_ids(c: Components) -> list[list[int]]:
    """The ids the two tokens get in each tokenizer (the last two, after the base vocabulary)."""
    return [[len(tok), len(tok) + 1] for tok in c.tokenizers]


def state_embeddings(state: Path) -> list[torch.Tensor]:
    """The two token embedding matrices a training state holds (accelerate's one file per trained module)."""
    return [load_safetensors(state / name)[0]["weight"] for name in ("model.safetensors", "model_1.safetensors")]


def test_saves_clip_l_and_clip_g_and_trains_only_the_new_rows(straight):
    tensors, metadata = load_safetensors(straight / "mytok.safetensors")
    base = tiny_sdxl()
    widths = [e.config.hidden_size for e in base.text_encoders]
    assert list(tensors) == ["clip_g", "clip_l"]
    assert tensors["clip_l"].shape == (2, widths[0]) and tensors["clip_g"].shape == (2, widths[1])
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert metadata["modelspec.title"] == TOKEN
    trained = state_embeddings(straight / "mytok-state")
    for key, encoder, tokenizer, weight, ids in zip(
        ("clip_l", "clip_g"), base.text_encoders, base.tokenizers, trained, new_ids(base)
    ):
        original = encoder.get_input_embeddings().weight.detach()
        assert weight.shape == (len(original) + 2, original.shape[1])
        assert torch.equal(weight[: len(original)], original), key
        assert torch.equal(weight[ids], tensors[key]), key
        (frog,) = tokenizer.encode("frog", add_special_tokens=False)
        assert all(not torch.allclose(row, original[frog], atol=1e-3) for row in tensors[key]), key
    earlier = load_safetensors(straight / "mytok-step00000002.safetensors")[0]
    assert all(not torch.equal(earlier[k], tensors[k]) for k in tensors)


def test_resume_from_a_state_is_step_exact(straight, sdxl_dir, data_dir, tmp_path):
    state = straight / "mytok-step00000002-state"
    sdxl_train_textual_inversion.main(argv(sdxl_dir, data_dir, tmp_path, *FOUR_STEPS, "--resume", str(state)))
    resumed = load_safetensors(tmp_path / "mytok.safetensors")[0]
    full = load_safetensors(straight / "mytok.safetensors")[0]
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)


def recipe_for(tmp_path: Path, *extra: str) -> TextualInversionRecipe:
    args = sdxl_train_textual_inversion.setup_parser().parse_args(argv("tiny-sdxl", tmp_path, tmp_path, *extra))
    return TextualInversionRecipe(settings_from_flags(TextualInversionSettings, args))


def test_weights_continue_from_safetensors_and_pt_files(straight, sdxl_dir, data_dir, tmp_path):
    saved = load_safetensors(straight / "mytok.safetensors")[0]
    torch.save(saved, tmp_path / "ours.pt")
    for path in (straight / "mytok.safetensors", tmp_path / "ours.pt"):
        recipe = recipe_for(tmp_path, "--weights", str(path))
        c = tiny_sdxl()
        recipe.setup(c, torch.device("cpu"), torch.float32)
        rows = [e.weight.detach()[ids] for e, ids in zip(recipe.token_embeddings, new_ids(tiny_sdxl()))]
        assert torch.equal(rows[0], saved["clip_l"]) and torch.equal(rows[1], saved["clip_g"])
    wrong = recipe_for(tmp_path, "--num_vectors_per_token", "3", "--weights", str(tmp_path / "ours.pt"))
    with pytest.raises(UserError, match=r"--weights .*ours\.pt: embedding shape \(2, 32\), this run needs \(3, 32\)"):
        wrong.setup(tiny_sdxl(), torch.device("cpu"), torch.float32)
    torch.save({"emb_params": saved["clip_l"]}, tmp_path / "sd1.pt")
    sd1 = recipe_for(tmp_path, "--weights", str(tmp_path / "sd1.pt"))
    with pytest.raises(UserError, match=r"sd1\.pt: holds an SD 1\.x/2\.x embedding"):
        sd1.setup(tiny_sdxl(), torch.device("cpu"), torch.float32)
    out = tmp_path / "out"
    sdxl_train_textual_inversion.main(
        argv(sdxl_dir, data_dir, out, "--max_train_steps", "1", "--weights", str(straight / "mytok.safetensors"))
    )
    again = torch.load(out / "mytok.pt", weights_only=True)
    assert list(again) == ["clip_l", "clip_g"]
    for key in again:
        assert not torch.equal(again[key], saved[key])
        assert torch.allclose(again[key], saved[key], atol=0.2), key


def test_samples_see_the_expanded_token_in_both_encoders(straight, tmp_path):
    from library.engine import SampleRequest
    from library.engine.wiring import parts_from_args, read_sample_settings
    from library.sampling import generate_image, line_to_prompt_dict, resolve_prompt

    assert len(list((straight / "sample").glob("mytok_000004_00_*_7.png"))) == 1
    (tmp_path / "prompts.txt").write_text(f"a photo of {TOKEN}{SAMPLE}\n")
    extra = ["--weights", str(straight / "mytok.safetensors"), "--sample_prompts", str(tmp_path / "prompts.txt")]
    args = sdxl_train_textual_inversion.setup_parser().parse_args(argv("tiny-sdxl", tmp_path, tmp_path, *extra))
    args.output_name = TOKEN
    recipe = TextualInversionRecipe(settings_from_flags(TextualInversionSettings, args))
    c = tiny_sdxl()
    recipe.setup(c, torch.device("cpu"), torch.float32)
    settings = read_sample_settings(args)
    sample = recipe.training_parts(parts_from_args(args, c), settings).sample
    sample(SampleRequest(components=c, step=3, epoch=None, output_dir=tmp_path, device=torch.device("cpu")))
    (written,) = (tmp_path / "sample").glob("mytok_000003_00_*_7.png")

    def render(text: str) -> np.ndarray:
        return np.asarray(generate_image(c, resolve_prompt(line_to_prompt_dict(text + SAMPLE)), settings, 7))

    expanded = render(f"a photo of {TOKEN} {TOKEN}1")
    assert np.array_equal(np.asarray(Image.open(written)), expanded)
    assert not np.array_equal(expanded, render(f"a photo of {TOKEN}"))


def test_a_token_either_tokenizer_has_is_refused(tmp_path):
    c = tiny_sdxl()
    c.tokenizers[1].add_tokens([f"{TOKEN}1"])
    with pytest.raises(UserError, match=r"--token_string: tokenizer 2 already has the token 'mytok1'"):
        recipe_for(tmp_path).setup(c, torch.device("cpu"), torch.float32)
    assert len(c.tokenizers[0]) == len(tiny_sdxl().tokenizers[0])


@pytest.mark.parametrize(
    "main, model, expected",
    [(sdxl_train_textual_inversion.main, "tiny-sd1", "SD"), (train_textual_inversion.main, "tiny-sdxl", "SDXL")],
)
def test_the_other_family_is_refused(main, model, expected, data_dir, tmp_path, capsys):
    assert run_cli(main, argv(model, data_dir, tmp_path / "out", "--max_train_steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {model} is an {expected}")
    assert ("the sdxl_* scripts" if expected == "SDXL" else "the scripts without the sdxl_ prefix") in err
    assert not (tmp_path / "out").exists()


def fixed_losses(candidates: list[list[torch.Tensor]], data_dir: Path) -> list[float]:
    """The training loss (epsilon MSE, fixed noise and timesteps) with each candidate's rows for the two tokens in
    the two encoders."""
    c = tiny_sdxl()
    added = add_tokens_to_all(c.tokenizers, c.text_encoders, [TOKEN, f"{TOKEN}1"], "--token_string")
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(data_dir.rglob("*.png"))]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    encode = c.family.text_encoding(TextEncodingSettings(), cached=False)
    losses = []
    with torch.no_grad():
        latents = (c.vae.encode(images).latent_dist.mean * c.family.latent_scale(c.vae)).repeat(10, 1, 1, 1)
        timesteps = torch.arange(50, 1000, 100).repeat_interleave(len(images))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        noisy = c.scheduler.add_noise(latents, noise, timesteps)
        for rows in candidates:
            for encoder, tokens, row in zip(c.text_encoders, added, rows):
                encoder.get_input_embeddings().weight[list(tokens.ids)] = row
            captions = [f"a photo of {TOKEN} {TOKEN}1"] * len(latents)
            cond = encode(c.text_encoders, c.tokenizers, captions, size_batch(64, 64, len(latents)))
            losses.append(float(torch.nn.functional.mse_loss(cond.predict(c.unet, noisy, timesteps), noise)))
    return losses


def test_learned_embedding_lowers_the_loss_against_the_init_word(straight, data_dir):
    """The tiny UNet barely depends on the text, so four steps lower the loss a little (1.15920 -> 1.15865)."""
    c = tiny_sdxl()
    init = []
    for encoder, tokenizer in zip(c.text_encoders, c.tokenizers):
        (frog,) = tokenizer.encode("frog", add_special_tokens=False)
        init.append(encoder.get_input_embeddings().weight.detach()[[frog, frog]])
    learned = load_safetensors(straight / "mytok.safetensors")[0]
    init_loss, learned_loss = fixed_losses([init, [learned["clip_l"], learned["clip_g"]]], data_dir)
    assert learned_loss < init_loss - 2e-4, (learned_loss, init_loss)
