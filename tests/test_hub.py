"""Hub upload and resume (library/hub.py) through the real huggingface_hub against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import pytest

from library.errors import UserError
from library.hub import HubPublisher, HubSettings, download_state, parse_resume_spec
from library.io import atomic_write_bytes
from tests.hub_server import FakeHub

TOKEN = "hf_secret_token_123"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub; tests/conftest.py sets HF_HUB_OFFLINE, which huggingface_hub read at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        yield server
    assert server.unknown == []


def make_state(folder: Path, seed: int) -> Path:
    """A state folder shaped like ours: binary files and a nested folder."""
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000 + seed))
    (folder / "optimizer.bin").write_bytes(bytes(range(256)) * (seed + 1))
    (folder / "sub" / "train_state.json").write_text(f'{{"step": {seed}}}')
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def settings(**flags) -> HubSettings:
    return HubSettings(huggingface_repo_id="me/my-lora", huggingface_token=TOKEN, **flags)


def test_model_and_state_land_byte_identical(hub: FakeHub, tmp_path: Path, caplog) -> None:
    model = tmp_path / "my-lora-000001.safetensors"
    model.write_bytes(os.urandom(5000))
    state = make_state(tmp_path / "my-lora-000001-state", 1)
    cfg = settings(huggingface_path_in_repo="runs/a/", save_state_to_huggingface=True, huggingface_repo_type="dataset")
    publisher = HubPublisher(cfg, endpoint=hub.url)
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        publisher.publish(model, state=False)
        publisher.publish(state, state=True)
        uploaded = publisher.close()
    assert uploaded == ["runs/a/my-lora-000001.safetensors", "runs/a/my-lora-000001-state"]
    repo = hub.repo("me/my-lora", "dataset")
    assert repo.private is True and len(repo.commits) == 2
    expected = {"runs/a/my-lora-000001.safetensors": model.read_bytes()}
    expected.update({f"runs/a/my-lora-000001-state/{k}": v for k, v in files_of(state).items()})
    assert repo.files == expected
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text and TOKEN not in repr(cfg)
    assert "Hub: uploaded 2 of 2 to dataset repo me/my-lora" in caplog.text


def test_states_skipped_without_flag_public_repo_and_stale_files_removed(hub: FakeHub, tmp_path: Path) -> None:
    state = make_state(tmp_path / "last-state", 2)
    publisher = HubPublisher(settings(huggingface_repo_visibility="public"), endpoint=hub.url)
    publisher.publish(state, state=True)
    assert publisher.close() == [] and hub.repos == {}

    publisher = HubPublisher(settings(huggingface_repo_visibility="public", save_state_to_huggingface=True), hub.url)
    publisher.publish(state, state=True)
    (state / "sub" / "train_state.json").unlink()
    (state / "optimizer.bin").write_bytes(b"new")
    publisher.publish(state, state=True)
    publisher.close()
    repo = hub.repo("me/my-lora")
    assert repo.private is False
    assert repo.files == {f"last-state/{k}": v for k, v in files_of(state).items()}


def test_async_uploads_finish_by_close_in_order(hub: FakeHub, tmp_path: Path, caplog) -> None:
    hub.commit_delay_s = 0.1
    models, saved = [], {}
    for i in range(4):
        models.append(tmp_path / f"m-{i}.safetensors")
        models[-1].write_bytes(os.urandom(100 + i))
        saved[models[-1].name] = models[-1].read_bytes()
    state = make_state(tmp_path / "last-state", 5)
    state_files = files_of(state)
    publisher = HubPublisher(settings(async_upload=True, save_state_to_huggingface=True), endpoint=hub.url)
    for model in models:
        publisher.publish(model, state=False)
    publisher.publish(state, state=True)
    assert publisher.uploaded != [m.name for m in models]  # still uploading: publish did not wait
    for model in models[1:]:
        model.unlink()  # a --save_last_n_epochs clean-up before the upload ran
    atomic_write_bytes(state / "optimizer.bin", b"a later save")  # how our saves replace a file
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        assert publisher.close() == [m.name for m in models] + ["last-state"]
    assert re.search(r"Hub: waiting for [1-5] pending upload\(s\) to me/my-lora", caplog.text)
    commits = hub.repo("me/my-lora").commits
    assert [sorted(files) for _, files in commits[:4]] == [sorted(m.name for m in models[: i + 1]) for i in range(4)]
    assert commits[-1][1] == saved | {f"last-state/{k}": v for k, v in state_files.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-state", "m-0.safetensors"]


def test_failed_upload_is_one_warning_and_training_goes_on(hub: FakeHub, tmp_path: Path, caplog) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    hub.fail_commits = 1
    publisher = HubPublisher(settings(), endpoint=hub.url)
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        publisher.publish(first, state=False)
        publisher.publish(second, state=False)
        assert publisher.close() == ["b.safetensors"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert f"could not upload {first} to me/my-lora as a.safetensors: " in warnings[0].getMessage()
    assert "500" in warnings[0].getMessage() and "Traceback" not in caplog.text
    assert "uploaded 1 of 2 to model repo me/my-lora (1 failed" in caplog.text
    assert hub.repo("me/my-lora").files == {"b.safetensors": b"second"}


def test_download_state_gives_identical_files(hub: FakeHub, tmp_path: Path) -> None:
    state = make_state(tmp_path / "out" / "my-lora-step00000010-state", 3)
    cfg = settings(huggingface_path_in_repo="ckpt", save_state_to_huggingface=True)
    publisher = HubPublisher(cfg, endpoint=hub.url)
    publisher.publish(state, state=True)
    publisher.publish(make_state(tmp_path / "other-state", 4), state=True)
    publisher.close()
    resume = HubSettings(huggingface_token=TOKEN, resume_from_huggingface=True)
    spec = "me/my-lora/ckpt/my-lora-step00000010-state"
    resume.check(spec)
    dest = tmp_path / "out" / "hub-resume" / parse_resume_spec(spec, resume).folder_name
    dest.mkdir(parents=True)
    (dest / "left-over").write_text("old")
    assert download_state(spec + ":main:model", resume, dest, endpoint=hub.url) == dest
    assert files_of(dest) == files_of(state)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["my-lora-step00000010-state"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("me", "--resume 'me' (with --resume_from_huggingface): write {repo_id}/{path_in_repo}"),
        ("me/my-lora/ckpt:main:model:x", "write {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]"),
        ("me/my-lora/ckpt::weights", "repo type 'weights' is not model, dataset or space"),
        ("me/my-lora/nothing", "--resume 'me/my-lora/nothing': no folder 'nothing' in model repo me/my-lora at main"),
        ("me/other/ckpt", "--resume 'me/other/ckpt': no model repo me/other (or no access"),
        ("me/my-lora/ckpt:v9", "--resume 'me/my-lora/ckpt:v9': me/my-lora has no revision 'v9'"),
    ],
)
def test_bad_resume_specs(hub: FakeHub, tmp_path: Path, spec: str, message: str) -> None:
    model = tmp_path / "x.safetensors"
    model.write_bytes(b"x")
    publisher = HubPublisher(settings(huggingface_path_in_repo="ckpt"), endpoint=hub.url)
    publisher.publish(model, state=False)
    publisher.close()
    with pytest.raises(UserError) as error:
        download_state(spec, HubSettings(resume_from_huggingface=True), tmp_path / "dest", endpoint=hub.url)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"save_state_to_huggingface": True}, "--save_state_to_huggingface needs --huggingface_repo_id"),
        ({"async_upload": True}, "--async_upload needs --huggingface_repo_id"),
        ({"huggingface_repo_id": "just-a-name"}, "--huggingface_repo_id 'just-a-name': write it as namespace/name"),
        ({"huggingface_repo_id": "a/b", "huggingface_repo_visibility": "secret"}, "use 'public' or 'private'"),
        ({"huggingface_repo_id": "a/b", "huggingface_repo_type": "space"}, "use 'model' (the default) or 'dataset'"),
        ({"resume_from_huggingface": True}, "--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}"),
    ],
)
def test_check_rejects_bad_combinations(flags: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        HubSettings(**flags).check(resume=None)


def test_settings_from_flags_reads_the_flags() -> None:
    from library.config.engine_flags import add_hub_arguments
    from library.config.settings import settings_from_flags

    parser = argparse.ArgumentParser()
    add_hub_arguments(parser)
    args = parser.parse_args(["--huggingface_repo_id", "me/x", "--async_upload", "--huggingface_token", TOKEN])
    cfg = settings_from_flags(HubSettings, args)
    assert cfg == HubSettings(huggingface_repo_id="me/x", async_upload=True, huggingface_token=TOKEN)
    assert cfg.private and cfg.repo_type == "model"
    cfg.check()


def test_train_network_uploads_its_model_and_state_and_resumes_from_the_hub(
    hub: FakeHub, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The real loop: the saved LoRA and state go to the Hub (in order, async), and a second run resumes from the
    uploaded state, downloaded under <output_dir>/hub-resume/, to the same weights as a straight run."""
    import torch
    from huggingface_hub import constants
    from safetensors.torch import load_file

    import train_network
    from tests.training import network_args, write_frog_dataset

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    data = write_frog_dataset(tmp_path / "data")
    upload = ["--huggingface_repo_id", "me/frog", "--huggingface_path_in_repo", "runs", "--async_upload"]
    first = tmp_path / "first"
    train_network.main(
        network_args(
            model_dir, data, first, "--max_train_steps", "2", "--save_state", *upload, "--save_state_to_huggingface"
        )
    )
    repo = hub.repo("me/frog", "model")
    assert repo.files["runs/lora.safetensors"] == (first / "lora.safetensors").read_bytes()
    assert {k for k in repo.files if k.startswith("runs/lora-state/")} == {
        f"runs/lora-state/{p.relative_to(first / 'lora-state').as_posix()}"
        for p in (first / "lora-state").rglob("*")
        if p.is_file()
    }
    resumed = tmp_path / "resumed"
    hub_resume = [
        "--resume_from_huggingface",
        "--resume",
        "me/frog/runs/lora-state",
        "--huggingface_repo_id",
        "me/frog",
    ]
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        train_network.main(network_args(model_dir, data, resumed, "--max_train_steps", "3", *hub_resume))
    local = resumed / "hub-resume" / "lora-state"
    assert f"resuming from {local} at step 2" in caplog.text
    straight = tmp_path / "straight"
    train_network.main(network_args(model_dir, data, straight, "--max_train_steps", "3"))
    a, b = load_file(resumed / "lora.safetensors"), load_file(straight / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert repo.files["lora.safetensors"] == (resumed / "lora.safetensors").read_bytes()
