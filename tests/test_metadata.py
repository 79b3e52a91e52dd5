"""ss_* metadata, sshs_* hashes and modelspec.* keys as sd-scripts writes them."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library import metadata as md
from library import modelspec as ms
from library.config.settings import settings_from_flags
from library.models.sd import SD1, SD2
from library.models.tiny import make_tiny_model
from networks import lora


def facts(**overrides) -> md.TrainingFacts:
    """Facts of a typical run; ``overrides`` may name recorded flags (``md.MetadataSettings`` fields) or computed
    facts alike."""
    flags = dict(
        output_name="mylora",
        learning_rate=1e-4,
        text_encoder_lr=5e-5,
        unet_lr=None,
        network_module="networks.lora",
        network_dim=8,
        network_alpha=4.0,
        mixed_precision="fp16",
        training_comment="hello",
    )
    computed = dict(
        session_id=1234,
        training_started_at=1700000000.5,
        num_train_images=20,
        num_reg_images=0,
        num_batches_per_epoch=10,
        num_epochs=3,
        max_train_steps=30,
        network_args={"conv_dim": "4"},
        seed=42,
        optimizer_name="torch.optim.adamw.AdamW",
        optimizer_args="weight_decay=0.1",
        base_model_version="sd_v1",
    )
    names = {f.name for f in dataclasses.fields(md.MetadataSettings)}
    for key, value in overrides.items():
        (flags if key in names else computed)[key] = value
    return md.TrainingFacts(flags=md.MetadataSettings(**flags), **computed)


def dreambooth_dataset() -> md.DatasetMetadata:
    return md.DatasetMetadata(
        is_dreambooth=True,
        batch_size=2,
        num_train_images=20,
        num_reg_images=4,
        resolution=(512, 512),
        enable_bucket=True,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        tag_frequency={"10_sks dog": {"sks": 2, "dog": 2}},
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 20}}, "mean_img_ar_error": 0.0},
        subsets=[
            md.SubsetMetadata(img_count=2, num_repeats=10, image_dir="/data/img/10_sks dog", class_tokens="sks dog"),
            md.SubsetMetadata(img_count=4, num_repeats=1, image_dir="/data/reg/1_dog", class_tokens="dog", is_reg=True),
        ],
    )


def test_training_metadata_keys_and_values():
    meta = md.build_training_metadata(facts(), [dreambooth_dataset()])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {
        "ss_session_id": "1234",
        "ss_training_started_at": "1700000000.5",
        "ss_output_name": "mylora",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "None",
        "ss_num_train_images": "20",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "10",
        "ss_num_epochs": "3",
        "ss_gradient_checkpointing": "False",
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": "30",
        "ss_lr_warmup_steps": "0",
        "ss_lr_scheduler": "constant",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_dropout": "None",
        "ss_mixed_precision": "fp16",
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": "None",
        "ss_cache_latents": "False",
        "ss_seed": "42",
        "ss_training_comment": "hello",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)",
        "ss_max_grad_norm": "1.0",
        "ss_multires_noise_discount": "0.3",
        "ss_prior_loss_weight": "1.0",
        "ss_debiased_estimation": "False",
        "ss_loss_type": "l2",
        "ss_huber_schedule": "snr",
        "ss_huber_c": "0.1",
        "ss_network_args": '{"conv_dim": "4"}',
    }
    assert {k: meta[k] for k in expected} == expected
    for key in (
        "ss_noise_offset",
        "ss_multires_noise_iterations",
        "ss_adaptive_noise_scale",
        "ss_zero_terminal_snr",
        "ss_sd_scripts_commit_hash",
        "ss_caption_dropout_rate",
        "ss_caption_dropout_every_n_epochs",
        "ss_caption_tag_dropout_rate",
        "ss_face_crop_aug_range",
        "ss_min_snr_gamma",
        "ss_scale_weight_norms",
        "ss_ip_noise_gamma",
        "ss_noise_offset_random_strength",
        "ss_max_token_length",
        "ss_lowram",
    ):
        assert key in meta, key

    datasets = json.loads(meta["ss_datasets"])
    assert len(datasets) == 1
    ds = datasets[0]
    assert ds["is_dreambooth"] is True and ds["batch_size_per_device"] == 2 and ds["resolution"] == [512, 512]
    assert ds["num_train_images"] == 20 and ds["num_reg_images"] == 4
    assert ds["enable_bucket"] is True and (ds["min_bucket_reso"], ds["max_bucket_reso"]) == (256, 1024)
    assert ds["tag_frequency"] == {"10_sks dog": {"sks": 2, "dog": 2}}
    assert ds["bucket_info"]["buckets"]["0"]["count"] == 20
    assert ds["subsets"][0]["image_dir"] == "10_sks dog" and ds["subsets"][0]["class_tokens"] == "sks dog"
    assert ds["subsets"][1]["is_reg"] is True and ds["subsets"][0]["num_repeats"] == 10
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks": 2, "dog": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}


def test_legacy_dataset_keys_without_dataset_config():
    meta = md.build_training_metadata(
        facts(train_batch_size=2, gradient_accumulation_steps=3, resolution="512,512"),
        [dreambooth_dataset()],
        use_user_config=False,
    )
    assert "ss_datasets" not in meta
    assert meta["ss_total_batch_size"] == "6" and meta["ss_batch_size_per_device"] == "2"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(meta["ss_bucket_info"])["mean_img_ar_error"] == 0.0


def test_model_name_and_hashes_of_base_model_file(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "base.safetensors"
    path.write_bytes(data)
    meta = md.build_training_metadata(facts(pretrained_model_name_or_path=str(path), vae=str(tmp_path)))
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_vae_name"] == tmp_path.name and meta["ss_new_vae_hash"] == "IsADirectory"
    hub = md.build_training_metadata(facts(pretrained_model_name_or_path="org/model"))
    assert hub["ss_sd_model_name"] == "org/model" and "ss_sd_model_hash" not in hub


def test_v2_model_version_comes_from_the_family():
    v_pred = md.build_training_metadata(md.TrainingFacts.from_settings(md.MetadataSettings(), SD2, True))
    assert v_pred["ss_base_model_version"] == "sd_v2_v" and v_pred["ss_v2"] == "True"
    sd2 = md.build_training_metadata(md.TrainingFacts.from_settings(md.MetadataSettings(), SD2, False))
    assert sd2["ss_base_model_version"] == "sd_v2" and sd2["ss_v2"] == "True"
    sd1 = md.build_training_metadata(md.TrainingFacts.from_settings(md.MetadataSettings(), SD1, False))
    assert sd1["ss_base_model_version"] == "sd_v1" and sd1["ss_v2"] == "False"


def test_from_settings_takes_flags_and_computed_values():
    ns = argparse.Namespace(lr_scheduler="cosine", seed=7, output_name="x", unrelated_flag=True, optimizer_args=None)
    settings = settings_from_flags(md.MetadataSettings, ns)
    f = md.TrainingFacts.from_settings(settings, SD1, False, seed=7, num_train_images=5, session_id=9)
    assert (f.flags.learning_rate, f.seed, f.flags.output_name, f.num_train_images, f.session_id) == (
        2e-6,
        7,
        "x",
        5,
        9,
    )
    assert f.flags.lr_scheduler == "cosine" and f.max_train_steps is None and f.network_args is None
    args = md.TrainingFacts.from_settings(
        md.MetadataSettings(optimizer_args=["weight_decay=0.1", "eps=1e-8"]), SD1, False
    )
    assert md.build_training_metadata(args)["ss_optimizer"] == "(weight_decay=0.1,eps=1e-8)"


def test_flags_given_to_train_network_are_recorded_as_given():
    """The ss_* values of flags come from the parsed command line, not from defaults (a guard against a settings
    class that misses a recorded flag)."""
    import train_network

    given = {
        "learning_rate": ("3e-4", "0.0003"),
        "unet_lr": ("2e-4", "0.0002"),
        "lr_scheduler": ("cosine", "cosine"),
        "lr_warmup_steps": ("7", "7"),
        "network_dim": ("8", "8"),
        "network_alpha": ("4", "4.0"),
        "network_dropout": ("0.1", "0.1"),
        "mixed_precision": ("bf16", "bf16"),
        "noise_offset": ("0.05", "0.05"),
        "multires_noise_iterations": ("6", "6"),
        "min_snr_gamma": ("5", "5.0"),
        "max_grad_norm": ("0.5", "0.5"),
        "clip_skip": ("2", "2"),
        "max_token_length": ("150", "150"),
        "prior_loss_weight": ("0.5", "0.5"),
        "training_comment": ("note", "note"),
        "loss_type": ("huber", "huber"),
        "zero_terminal_snr": (None, "True"),
        "cache_latents": (None, "True"),
        "gradient_checkpointing": (None, "True"),
    }
    argv = []
    for name, (value, _) in given.items():
        argv += [f"--{name}"] + ([] if value is None else [value])
    args = train_network.setup_parser().parse_args(argv)
    facts = md.TrainingFacts.from_settings(settings_from_flags(md.MetadataSettings, args), SD1, False)
    written = md.build_training_metadata(facts)
    assert {name: written[f"ss_{name}"] for name in given} == {name: ss for name, (_, ss) in given.items()}


def test_no_metadata_keeps_only_minimum_keys_then_modelspec():
    meta = md.build_training_metadata(facts())
    spec = ms.build_modelspec(SD1, False, True, False, 1700000000.0, title="t")
    saved = md.metadata_for_save(meta, steps=30, epoch=3, no_metadata=True, modelspec=spec)
    ss_keys = {k for k in saved if k.startswith("ss_")}
    assert ss_keys == {
        "ss_v2",
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    }
    assert saved["modelspec.title"] == "t"
    full = md.metadata_for_save(meta, steps=30, epoch=3, no_metadata=False, modelspec=spec)
    assert full["ss_steps"] == "30" and full["ss_epoch"] == "3" and float(full["ss_training_finished_at"]) > 0
    assert "ss_steps" not in meta  # the run's dict is not changed by a save


def test_modelspec_sd1_lora():
    ts = 1700000000.75
    spec = ms.build_modelspec(SD1, False, True, False, ts, reso="512,768", author="me", tags="a,b", clip_skip=2)
    assert spec == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"LoRA@{ts}",
        "modelspec.resolution": "512x768",
        "modelspec.author": "me",
        "modelspec.tags": "a,b",
        "modelspec.date": datetime.datetime.fromtimestamp(1700000000).isoformat(),
        "modelspec.prediction_type": "epsilon",
        "modelspec.encoder_layer": "2",
    }


def test_modelspec_sd2_variants_and_from_args():
    v = ms.build_modelspec(SD2, True, True, False, 0.0, title="x")
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.resolution"] == "768x768" and v["modelspec.prediction_type"] == "v"
    assert ms.build_modelspec(SD2, False, True, False, 0.0)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    ti = ms.build_modelspec(SD1, False, False, True, 0.0)
    assert ti["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert ti["modelspec.implementation"] == ms.IMPL_STABILITY_AI
    ckpt = ms.build_modelspec(SD1, False, False, False, 0.0)
    assert ckpt["modelspec.architecture"] == "stable-diffusion-v1" and ckpt["modelspec.title"] == "Checkpoint@0.0"

    parser = argparse.ArgumentParser()
    md.add_metadata_arguments(parser)
    args = parser.parse_args(
        [
            "--metadata_title",
            "My LoRA",
            "--metadata_license",
            "MIT",
            "--metadata_trigger_phrase",
            "sks",
            "--no_metadata",
        ]
    )
    assert args.no_metadata and args.training_comment is None
    args.resolution, args.min_timestep = (640, 640), 100
    spec = ms.modelspec_from_settings(settings_from_flags(md.MetadataSettings, args), SD1, False)
    assert spec["modelspec.title"] == "My LoRA" and spec["modelspec.license"] == "MIT"
    assert spec["modelspec.trigger_phrase"] == "sks" and spec["modelspec.resolution"] == "640x640"
    assert spec["modelspec.timestep_range"] == "100,1000"


def test_hashes_of_a_saved_lora_file(tmp_path):
    c = make_tiny_model()
    net = lora.create_network(1.0, 64, 1.0, c.vae, c.text_encoder, c.unet)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_()
    meta = md.metadata_for_save(
        md.build_training_metadata(facts()),
        steps=1,
        epoch=1,
        no_metadata=False,
        modelspec=ms.build_modelspec(SD1, False, True, False, 0.0, title="user title"),
    )
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, None, meta)
    raw = path.read_bytes()
    assert len(raw) > 0x110000  # big enough for the legacy hash to cover real bytes
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert stored["modelspec.title"] == "user title" and stored["ss_output_name"] == "mylora"

    # sshs_model_hash: sha256 of the tensor bytes, i.e. everything after the 8-byte length and the JSON header
    header_len = int.from_bytes(raw[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()

    # sshs_legacy_hash: first 8 hex of sha256 of 64 KiB at 1 MiB of the file written with only the ss_* metadata
    ss_only = {k: v for k, v in stored.items() if k.startswith("ss_")}
    assert "sshs_model_hash" not in ss_only and "modelspec.title" not in ss_only
    save_file(load_file(path), tmp_path / "ss_only.safetensors", ss_only)
    ss_raw = (tmp_path / "ss_only.safetensors").read_bytes()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(ss_raw[0x100000:0x110000]).hexdigest()[:8]

    # editing user metadata leaves both hashes valid; editing ss_* changes the legacy hash
    edited = dict(meta, **{"modelspec.title": "renamed"})
    assert md.precalculate_safetensors_hashes(load_file(path), edited) == (
        stored["sshs_model_hash"],
        stored["sshs_legacy_hash"],
    )
    changed = dict(meta, ss_training_comment="a much longer comment that moves the tensor data")
    assert md.precalculate_safetensors_hashes(load_file(path), changed)[1] != stored["sshs_legacy_hash"]


@pytest.mark.parametrize("small", [b"", b"x" * 100])
def test_legacy_hash_of_short_data_is_hash_of_nothing(small):
    assert md.addnet_hash_legacy(small) == hashlib.sha256(b"").hexdigest()[:8]


PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def test_every_metadata_flag_fills_its_modelspec_key_in_the_written_file(tmp_path):
    """sd-scripts' --metadata_* flags each fill modelspec.<name>; a thumbnail file is stored as a data: URL."""
    import train_textual_inversion
    from library.io import save_safetensors

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(PNG_BYTES)
    args = train_textual_inversion.setup_parser().parse_args(
        ["--metadata_usage_hint", "use <tok> at weight 0.8", "--metadata_thumbnail", str(thumb)]
        + ["--metadata_merged_from", "a, b", "--metadata_preprocessor", "canny"]
        + ["--metadata_is_negative_embedding", "true", "--metadata_description", "d", "--output_name", "tok"]
    )
    spec = ms.modelspec_from_settings(
        settings_from_flags(md.MetadataSettings, args), SD1, False, lora=False, textual_inversion=True
    )
    path = tmp_path / "emb.safetensors"
    save_safetensors({"emb_params": torch.zeros(1, 4)}, path, spec)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert stored["modelspec.usage_hint"] == "use <tok> at weight 0.8"
    assert stored["modelspec.thumbnail"] == "data:image/png;base64,iVBORw0KGgoAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    assert stored["modelspec.merged_from"] == "a, b"
    assert stored["modelspec.preprocessor"] == "canny"
    assert stored["modelspec.is_negative_embedding"] == "true"
    assert stored["modelspec.description"] == "d" and stored["modelspec.title"] == "tok"
    assert stored["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    unset = ms.modelspec_from_settings(
        settings_from_flags(md.MetadataSettings, train_textual_inversion.setup_parser().parse_args([])), SD1, False
    )
    assert not {"usage_hint", "thumbnail", "merged_from", "preprocessor", "is_negative_embedding"} & {
        k.removeprefix("modelspec.") for k in unset
    }


def test_thumbnail_is_checked_at_start_up_and_data_urls_are_kept(tmp_path):
    from library.errors import UserError

    parser = argparse.ArgumentParser()
    md.add_metadata_arguments(parser)
    url = "data:image/webp;base64,AAAA"
    assert ms.thumbnail_data_url(parser.parse_args(["--metadata_thumbnail", url]).metadata_thumbnail) == url
    import train_network

    with pytest.raises(UserError, match=r"argument --metadata_thumbnail: '.*nope.png' is neither a data: URL nor an"):
        train_network.setup_parser().parse_args(["--metadata_thumbnail", str(tmp_path / "nope.png")])
