"""train_db.py end to end: DreamBooth folders and TOML subsets, every save format, step-exact resume,
--stop_text_encoder_training, prior preservation, and the worked example of docs/train_db.md."""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_db
from library.cli import run_cli
from library.models.load import load_model
from tests.conftest import REPO
from tests.images import write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from library.models.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("model") / "tiny"
    make_tiny_model().to_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``img/2_sks dog`` (instance images, captioned by their class tokens) and ``reg/1_dog`` (class images)."""
    root = tmp_path_factory.mktemp("db")
    for i in range(2):
        write_image(root / "img" / "2_sks dog" / f"a{i}.png", seed=i)
        write_image(root / "reg" / "1_dog" / f"r{i}.png", seed=10 + i)
    return root


def db_args(model: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--resolution",
        "64",
        "--output_dir",
        str(out),
        "--output_name",
        "db",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--seed",
        "5",
        *extra,
    ]


def folders(data: Path) -> list[str]:
    return ["--train_data_dir", str(data / "img"), "--reg_data_dir", str(data / "reg")]


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    c = load_model(path)
    return {name: dict(getattr(c, name).state_dict()) for name in ("unet", "text_encoder", "vae")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "save_as, names",
    [
        ("safetensors", ["db-step00000001.safetensors", "db-step00000002.safetensors", "db.safetensors"]),
        ("ckpt", ["db-step00000001.ckpt", "db-step00000002.ckpt", "db.ckpt"]),
        ("diffusers", ["db", "db-step00000001", "db-step00000002"]),
        ("diffusers_safetensors", ["db", "db-step00000001", "db-step00000002"]),
    ],
)
def test_trains_unet_and_text_encoder_and_saves_each_format(model_dir, data, tmp_path, save_as, names):
    out = tmp_path / "out"
    argv = db_args(model_dir, out, *folders(data), "--max_train_steps", "2", "--save_every_n_steps", "1")
    train_db.main([*argv, "--save_model_as", save_as])
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "db_report.txt"])
    if save_as.startswith("diffusers"):
        weight_file = "diffusion_pytorch_model." + ("safetensors" if save_as.endswith("safetensors") else "bin")
        assert (out / "db" / "unet" / weight_file).is_file()
    ordered = sorted(names, key=lambda name: (not name.startswith("db-"), name))
    base, first, last = weights(model_dir), weights(out / ordered[0]), weights(out / ordered[-1])
    for part in ("unet", "text_encoder"):
        assert not same(base[part], first[part]) and not same(first[part], last[part]), part
    assert same(base["vae"], last["vae"])


def test_save_precision_and_model_format_default(model_dir, data, tmp_path):
    """Without --save_model_as a diffusers base is saved as diffusers (safetensors with --use_safetensors)."""
    out = tmp_path / "out"
    train_db.main(
        [
            *db_args(model_dir, out, *folders(data), "--max_train_steps", "1"),
            "--use_safetensors",
            "--save_precision",
            "fp16",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == ["db", "db_report.txt"]
    saved = load_file(out / "db" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    assert (out / "db" / "text_encoder" / "model.safetensors").is_file()
    assert not same(weights(model_dir)["unet"], weights(out / "db")["unet"])


def test_toml_subsets_with_class_tokens_and_is_reg(model_dir, data, tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(data / 'img' / '2_sks dog').as_posix()}'\n"
        "  class_tokens = 'sks dog'\n  num_repeats = 2\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(data / 'reg' / '1_dog').as_posix()}'\n"
        "  class_tokens = 'dog'\n  is_reg = true\n"
    )
    out = tmp_path / "out"
    result_code = run_cli(
        train_db.main,
        [
            *db_args(model_dir, out, "--dataset_config", str(config), "--max_train_epochs", "1"),
            "--save_model_as",
            "safetensors",
        ],
    )
    assert result_code == 0
    assert not same(weights(model_dir)["unet"], weights(out / "db.safetensors")["unet"])


def test_refuses_fine_tuning_data_with_one_line(model_dir, data, tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text('{"a0": {"caption": "a dog"}}')
    argv = db_args(
        model_dir, tmp_path / "out", "--in_json", str(meta), "--train_data_dir", str(data / "img" / "2_sks dog")
    )
    assert run_cli(train_db.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --in_json: fine-tuning datasets")
    assert "not supported by this script" in err[-1] and "DreamBooth" in err[-1]
    assert not (tmp_path / "out").exists()


def test_resume_is_step_exact_and_text_encoder_stops_after_n_steps(model_dir, data, tmp_path):
    """4 steps straight == 2 steps + resume; the text encoder changes in steps 1-3 only (stop at 3)."""
    common = [*folders(data), "--max_train_steps", "4", "--stop_text_encoder_training", "3", "--save_model_as"]
    straight = tmp_path / "straight"
    train_db.main(db_args(model_dir, straight, *common, "safetensors", "--save_every_n_steps", "1", "--save_state"))
    resumed = tmp_path / "resumed"
    state = straight / "db-step00000002-state"
    train_db.main(db_args(model_dir, resumed, *common, "safetensors", "--resume", str(state)))
    final, again = weights(straight / "db.safetensors"), weights(resumed / "db.safetensors")
    for part in ("unet", "text_encoder"):
        assert same(final[part], again[part]), part
    steps = [weights(straight / f"db-step{i:08d}.safetensors") for i in (1, 2, 3, 4)]
    assert not same(steps[1]["text_encoder"], steps[2]["text_encoder"])
    assert same(steps[2]["text_encoder"], steps[3]["text_encoder"])
    assert same(steps[3]["text_encoder"], final["text_encoder"])
    assert not same(steps[2]["unet"], steps[3]["unet"])


def test_resume_after_the_text_encoder_stopped_keeps_it_stopped(model_dir, data, tmp_path):
    """--stop_text_encoder_training 1, resumed at step 2: the resumed run must not train the text encoder again."""
    common = [*folders(data), "--max_train_steps", "3", "--stop_text_encoder_training", "1", "--save_model_as"]
    straight = tmp_path / "straight"
    train_db.main(db_args(model_dir, straight, *common, "safetensors", "--save_every_n_steps", "1", "--save_state"))
    resumed = tmp_path / "resumed"
    train_db.main(
        db_args(model_dir, resumed, *common, "safetensors", "--resume", str(straight / "db-step00000002-state"))
    )
    final, again = weights(straight / "db.safetensors"), weights(resumed / "db.safetensors")
    for part in ("unet", "text_encoder"):
        assert same(final[part], again[part]), part
    base, step1 = weights(model_dir), weights(straight / "db-step00000001.safetensors")
    assert not same(base["text_encoder"], step1["text_encoder"])
    assert same(step1["text_encoder"], final["text_encoder"])
    assert not same(step1["unet"], final["unet"])


def test_stop_text_encoder_training_minus_one_never_trains_it(model_dir, data, tmp_path):
    out = tmp_path / "out"
    train_db.main(
        db_args(model_dir, out, *folders(data), "--max_train_steps", "1", "--stop_text_encoder_training", "-1")
        + ["--save_model_as", "safetensors", "--no_token_padding"]
    )
    base, trained = weights(model_dir), weights(out / "db.safetensors")
    assert same(base["text_encoder"], trained["text_encoder"])
    assert not same(base["unet"], trained["unet"])


def test_prior_loss_weight_weights_the_regularisation_images_only(model_dir, data, tmp_path):
    """One step on one batch of every sample: --prior_loss_weight changes the result with class images only."""

    def run(name: str, weight: str, reg: bool) -> dict[str, torch.Tensor]:
        data_flags = folders(data) if reg else ["--train_data_dir", str(data / "img")]
        argv = db_args(model_dir, tmp_path / name, *data_flags, "--max_train_steps", "1", "--train_batch_size", "8")
        train_db.main([*argv, "--prior_loss_weight", weight, "--save_model_as", "safetensors"])
        return weights(tmp_path / name / "db.safetensors")["unet"]

    assert not same(run("reg1", "1.0", True), run("reg05", "0.5", True))
    assert same(run("plain1", "1.0", False), run("plain05", "0.5", False))


# The docs' bash block runs in bash (quoting, variables, here-documents, ``mkdir``, ``ls``, ``-e``); each ``python
# <script>`` in it is handed to the test process, which runs the script's own ``__main__`` block there and answers
# with its exit code (no interpreter start per command; tests/test_cli.py runs one entry script as a real program).
PYTHON_SHIM = 'python() { printf "%s\\0" "$#" "$@" >&"$SDT_REQUEST"; read -r code <&"$SDT_ANSWER"; return "$code"; }'


def run_script_in_process(argv: list[str]) -> int:
    """``python <argv>`` as the docs write it, run in this process from the repository root; its exit code."""
    assert argv and argv[0].endswith(".py"), f"docs example: not a script command: python {' '.join(argv)}"
    saved = sys.argv
    sys.argv = list(argv)
    try:
        with contextlib.chdir(REPO):
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def run_bash_with_python_in_process(script: str, log: Path) -> None:
    """Run ``script`` with ``bash -e``, each ``python ...`` command in it run by :func:`run_script_in_process`."""
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    env = {**os.environ, "SDT_REQUEST": str(request_write), "SDT_ANSWER": str(answer_read)}
    with open(log, "wb") as out:
        bash = subprocess.Popen(
            ["bash", "-e", "-c", f"{PYTHON_SHIM}\n{script}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(request_write, answer_read),
        )
    os.close(request_write)
    os.close(answer_read)
    try:
        with os.fdopen(request_read, "rb") as requests, os.fdopen(answer_write, "w") as answers:
            fields = [""]  # NUL-separated: the argument count, then the arguments; the last item is unfinished
            while chunk := requests.read1(65536):
                fields[-1:] = (fields[-1] + chunk.decode()).split("\0")
                while len(fields) > 1 and len(fields) - 1 > int(fields[0]):
                    count = int(fields[0])
                    argv, fields = fields[1 : 1 + count], fields[1 + count :]
                    answers.write(f"{run_script_in_process(argv)}\n")
                    answers.flush()
        assert bash.wait(timeout=300) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if bash.poll() is None:
            bash.kill()
            bash.wait()


def run_docs_example(page: str, tmp_path: Path) -> Path:
    """Run the ``bash`` block of ``docs/<page>`` from the repository root, its /tmp/<demo> folder moved to tmp_path."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"docs/{page} should have exactly one runnable bash block"
    demo = re.search(r"/tmp/[\w-]+", blocks[0]).group(0)
    out = tmp_path / "demo"
    assert re.search(r"(?m)^python ", blocks[0]), f"docs/{page}: the example runs no python script"
    run_bash_with_python_in_process(blocks[0].replace(demo, str(out)), tmp_path / "bash.log")
    return out


def test_docs_example_runs(tmp_path):
    out = run_docs_example("train_db.md", tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["frog-db.safetensors", "frog-db_report.txt"]
    assert not same(weights("tiny-sd1")["unet"], weights(out / "frog-db.safetensors")["unet"])
