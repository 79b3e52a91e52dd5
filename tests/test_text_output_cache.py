"""Text-encoder output caching: cached conditioning equals live encoding exactly, in memory and on disk; an edited
caption, other tokenizer, weights or settings are re-encoded; sd-scripts' refused combinations are one-line errors."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from library.config.dataset_config import dataset_flags
from library.config.flags import add_dataset_arguments
from library.config.sdxl_flags import add_sdxl_arguments
from library.config.settings import settings_from_flags
from library.dataset.loader import TrainDataset, build_train_dataset
from library.errors import UserError
from library.models.family import Conditioning, family_named
from library.models.tiny import make_tiny_model, tiny_model
from library.text.encode import TextEncodingSettings
from library.text.output_cache import (
    OutputLayout,
    TextOutputCacheSettings,
    cache_text_outputs,
    check_text_output_cache,
)
from tests.images import write_image

CAPTIONS = {"a": "a red cat", "b": "a blue dog", "c": "a red cat"}
SETTINGS_ID = "sd1:TextEncodingSettings()"


class Counting:
    """A text encoding that records the captions it is asked for."""

    def __init__(self, encode: Any) -> None:
        self.encode = encode
        self.calls: list[list[str]] = []

    def __call__(self, text_encoders, tokenizers, captions, batch=None) -> Conditioning:
        self.calls.append(list(captions))
        return self.encode(text_encoders, tokenizers, captions, batch)


def _data(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "2_sks"
    for stem, caption in CAPTIONS.items():
        write_image(folder / f"{stem}.png", (64, 64), seed=len(stem) + ord(stem))
        (folder / f"{stem}.caption").write_text(caption, encoding="utf-8")
    return folder


def _train(tmp_path: Path, *extra: str) -> TrainDataset:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(
        ["--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--train_batch_size", "2", *extra]
    )
    return build_train_dataset(dataset_flags(args), {"dreambooth"}, seed=4, progress=False)


def _batches(train: TrainDataset) -> list[dict]:
    return [train.load_batch(p) for epoch in (1, 2) for p in train.batch_plan(epoch)]


def _assert_same(a: Conditioning, b: Conditioning) -> None:
    assert torch.equal(a.hidden_states, b.hidden_states)
    assert a.unet_kwargs.keys() == b.unet_kwargs.keys()
    for key in a.unet_kwargs:
        for name, value in a.unet_kwargs[key].items():
            assert torch.equal(value, b.unet_kwargs[key][name]), name


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_conditioning_equals_live_encoding(tmp_path, to_disk):
    folder = _data(tmp_path)
    model = make_tiny_model()
    live = model.family.text_encoding(TextEncodingSettings())
    counting = Counting(live)
    train = _train(tmp_path)
    cached = cache_text_outputs(
        train, counting, model.text_encoders, model.tokenizers, settings_id=SETTINGS_ID, to_disk=to_disk, progress=False
    )
    assert sorted(sum(counting.calls, [])) == ["a blue dog", "a red cat"]  # each caption once
    counting.calls.clear()
    for batch in _batches(train):
        with torch.no_grad():
            expected = live(model.text_encoders, model.tokenizers, batch["captions"], batch)
        got = cached(model.text_encoders, model.tokenizers, batch["captions"], batch)
        _assert_same(got, expected)
        assert not got.hidden_states.requires_grad
    assert counting.calls == []  # served from the cache
    files = sorted(p.name for p in folder.glob("*_te_outputs.npz"))
    assert files == (["a_te_outputs.npz", "b_te_outputs.npz", "c_te_outputs.npz"] if to_disk else [])
    if to_disk:
        with np.load(folder / "b_te_outputs.npz") as z:
            assert set(z.files) == {"hidden_state", "caption", "cache_key"}
            assert str(z["caption"]) == "a blue dog" and z["hidden_state"].shape == (77, 32)


def test_disk_cache_is_reused_and_an_edited_caption_re_encoded(tmp_path):
    folder = _data(tmp_path)
    model = make_tiny_model()
    live = model.family.text_encoding(TextEncodingSettings())

    def run(settings_id: str = SETTINGS_ID, tokenizers: Sequence[Any] | None = None) -> tuple[Counting, Any]:
        counting = Counting(live)
        cached = cache_text_outputs(
            _train(tmp_path),
            counting,
            model.text_encoders,
            tokenizers or model.tokenizers,
            settings_id=settings_id,
            to_disk=True,
            progress=False,
        )
        return counting, cached

    run()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    counting, _ = run()
    assert counting.calls == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")} == before

    (folder / "b.caption").write_text("a green frog", encoding="utf-8")
    counting, cached = run()
    assert counting.calls == [["a green frog"]]
    with np.load(folder / "b_te_outputs.npz") as z:
        assert str(z["caption"]) == "a green frog"
    with torch.no_grad():
        expected = live(model.text_encoders, model.tokenizers, ["a green frog", "a red cat"])
    _assert_same(cached(model.text_encoders, model.tokenizers, ["a green frog", "a red cat"]), expected)

    counting, _ = run(settings_id="sd1:TextEncodingSettings(clip_skip=2)")
    assert sorted(sum(counting.calls, [])) == ["a green frog", "a red cat"]

    tokenizer = model.tokenizers[0]
    tokenizer.add_tokens(["<new-token>"])  # e.g. a textual-inversion token: other ids, other outputs
    counting, _ = run(settings_id="sd1:TextEncodingSettings(clip_skip=2)", tokenizers=[tokenizer])
    assert sorted(sum(counting.calls, [])) == ["a green frog", "a red cat"]

    with torch.no_grad():
        next(model.text_encoder.parameters()).add_(0.01)  # other weights (another base model)
    counting, _ = run(settings_id="sd1:TextEncodingSettings(clip_skip=2)", tokenizers=[tokenizer])
    assert sorted(sum(counting.calls, [])) == ["a green frog", "a red cat"]


def test_a_caption_missing_from_the_cache_is_encoded_live(tmp_path, caplog):
    _data(tmp_path)
    model = make_tiny_model()
    live = model.family.text_encoding(TextEncodingSettings())
    cached = cache_text_outputs(
        _train(tmp_path), live, model.text_encoders, model.tokenizers, settings_id=SETTINGS_ID, to_disk=False
    )
    with torch.no_grad():
        expected = live(model.text_encoders, model.tokenizers, ["a red cat", "an unseen caption"])
    _assert_same(cached(model.text_encoders, model.tokenizers, ["a red cat", "an unseen caption"]), expected)
    assert "1 caption(s) were not in the text-encoder output cache" in caplog.text


def test_sdxl_caches_only_caption_parts_and_writes_sd_scripts_keys(tmp_path):
    folder = _data(tmp_path)
    for stem, size in (("a", (96, 64)), ("b", (64, 96))):
        write_image(folder / f"{stem}.png", size, seed=9)
    model = tiny_model(family_named("sdxl"))
    live = model.family.text_encoding(TextEncodingSettings())
    layout = OutputLayout.per_encoder(model.text_encoders, extras=model.family.text_output_extras())
    train = _train(tmp_path, "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--flip_aug")
    cached = cache_text_outputs(
        train,
        live,
        model.text_encoders,
        model.tokenizers,
        settings_id="sdxl:TextEncodingSettings()",
        to_disk=True,
        layout=layout,
        finish=model.family.finish_conditioning,
        progress=False,
    )
    with np.load(folder / "a_te_outputs.npz") as z:
        assert set(z.files) == {"hidden_state1", "hidden_state2", "pool2", "caption", "cache_key"}
        assert z["hidden_state1"].shape == (77, 32) and z["hidden_state2"].shape == (77, 32)
        assert z["pool2"].shape == (16,)
    sizes = set()
    for batch in _batches(train):
        with torch.no_grad():
            expected = live(model.text_encoders, model.tokenizers, batch["captions"], batch)
        got = cached(model.text_encoders, model.tokenizers, batch["captions"], batch)
        _assert_same(got, expected)
        sizes.update(tuple(row.tolist()) for row in got.unet_kwargs["added_cond_kwargs"]["time_ids"])
    assert len(sizes) >= 3  # the batch's sizes and crops, not one cached value


@pytest.mark.parametrize(
    "key, value",
    [
        ("shuffle_caption", True),
        ("caption_dropout_rate", 0.1),
        ("caption_dropout_every_n_epochs", 2),
        ("caption_tag_dropout_rate", 0.1),
        ("token_warmup_step", 5),
        ("enable_wildcard", True),
    ],
)
@pytest.mark.parametrize("to_disk", [False, True])
def test_changing_captions_are_refused(tmp_path, key, value, to_disk):
    _data(tmp_path)
    extra = [f"--{key}"] if value is True else [f"--{key}", str(value)]
    train = _train(tmp_path, *extra)
    settings = TextOutputCacheSettings(True, to_disk)
    flag = "--cache_text_encoder_outputs_to_disk" if to_disk else "--cache_text_encoder_outputs"
    with pytest.raises(UserError) as e:
        check_text_output_cache(settings, train.datasets)
    message = str(e.value)
    assert f"--{key}" in message and flag in message and "\n" not in message
    check_text_output_cache(TextOutputCacheSettings(), train.datasets)  # no caching: nothing to refuse


def test_a_trained_text_encoder_is_refused(tmp_path):
    _data(tmp_path)
    train = _train(tmp_path)
    check_text_output_cache(TextOutputCacheSettings(True), train.datasets)
    with pytest.raises(UserError, match="--cache_text_encoder_outputs cannot be combined with --train_text_encoder"):
        check_text_output_cache(
            TextOutputCacheSettings(True), train.datasets, text_encoder_trained_by="--train_text_encoder"
        )


def test_flags_read_into_settings():
    parser = argparse.ArgumentParser()
    add_sdxl_arguments(parser)
    settings = settings_from_flags(TextOutputCacheSettings, parser.parse_args(["--cache_text_encoder_outputs_to_disk"]))
    assert settings.enabled and settings.flag == "--cache_text_encoder_outputs_to_disk"
    assert not settings_from_flags(TextOutputCacheSettings, parser.parse_args([])).enabled


def test_an_sd_scripts_file_without_validity_is_re_encoded(tmp_path):
    folder = _data(tmp_path)
    np.savez(folder / "a_te_outputs.npz", hidden_state=np.zeros((77, 32), np.float32))  # sd-scripts keys only
    model = make_tiny_model()
    live = model.family.text_encoding(TextEncodingSettings())
    counting = Counting(live)
    cache_text_outputs(
        _train(tmp_path), counting, model.text_encoders, model.tokenizers, settings_id=SETTINGS_ID, to_disk=True
    )
    with np.load(folder / "a_te_outputs.npz") as z:
        assert str(z["caption"]) == "a red cat" and np.abs(z["hidden_state"]).sum() > 0
