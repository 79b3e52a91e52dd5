"""Golden values: the first per-step losses of train_network.py (LoRA) and train_db.py (DreamBooth with class images
and prior preservation) on the bundled tiny-shapes model with fixed seeds, pinned to a tight tolerance.

On CPU the runs are deterministic, so any change to noise, timesteps, targets, loss scaling, prior weighting, how
a LoRA is applied or how cached latents are drawn (the LoRA run caches them; the images are fresh copies, so a seed
that depended on file times would move it) moves these numbers and fails here. ``tools/update_golden_losses.py``
rewrites ``tests/data/golden_losses.json`` on purpose (docs/testing.md says when that is legitimate).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from library.shapes.scenes import Scene, write_dataset
from tests.conftest import REPO
from tests.shapes_learning import copy_concept_images

GOLDEN = REPO / "tests" / "data" / "golden_losses.json"
MODEL = "tiny-shapes"
MODEL_DIR = REPO / "library" / "data" / "tiny-shapes"
STEPS = 5
RELATIVE_TOLERANCE = 1e-5

BASE = ("--pretrained_model_name_or_path", MODEL)
COMMON = ("--resolution", "64", "--optimizer_type", "AdamW", "--seed", "7", "--max_data_loader_n_workers", "0")
COMMON += ("--mixed_precision", "no", "--max_train_steps", str(STEPS), "--caption_extension", ".txt")
NETWORK = ("--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4")
NETWORK += ("--learning_rate", "2e-3", "--train_batch_size", "2", "--cache_latents")  # as README's job does
DREAMBOOTH = ("--learning_rate", "1e-4", "--train_batch_size", "2", "--prior_loss_weight", "1.0")
CLASS_SCENES = (("red", "white"), ("green", "black"), ("blue", "gray"), ("yellow", "blue"))


def model_fingerprint(folder: Path = MODEL_DIR) -> str:
    """SHA-256 over the bundled model's files (names and bytes), so a swapped checkpoint is told apart from a code
    change when the losses differ."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_data(root: Path) -> tuple[Path, Path]:
    """Four concept images as ``img/2_sks circle`` and four rendered solid circles as the class images
    ``reg/1_circle``; returns the two parent folders."""
    copy_concept_images(root / "img" / "2_sks circle", count=4)
    scenes = [Scene(colour, "circle", background, 64, 64) for colour, background in CLASS_SCENES]
    write_dataset(root / "reg" / "1_circle", scenes, seed=0)
    return root / "img", root / "reg"


def read_losses(logging_dir: Path) -> list[float]:
    """The ``loss/current`` scalars of the one TensorBoard event file under ``logging_dir``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = logging_dir.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    return [e.value for e in sorted(events.Scalars("loss/current"), key=lambda e: e.step)]


def outputs(out: Path, name: str) -> list[str]:
    return ["--output_dir", str(out), "--output_name", name, "--logging_dir", str(out / "logs")]


def network_run(img: Path, reg: Path, out: Path) -> None:
    import train_network

    train_network.main([*BASE, "--train_data_dir", str(img), *COMMON, *NETWORK, *outputs(out, "lora")])


def dreambooth_run(img: Path, reg: Path, out: Path) -> None:
    import train_db

    folders = ["--train_data_dir", str(img), "--reg_data_dir", str(reg)]
    train_db.main([*BASE, *folders, *COMMON, *DREAMBOOTH, "--save_model_as", "safetensors", *outputs(out, "db")])


RUNS: dict[str, Callable[[Path, Path, Path], None]] = {
    "train_network_lora": network_run,
    "train_db_prior_preservation": dreambooth_run,
}
"""The pinned runs: name → a function running it on (instance folder, class folder, output folder)."""


def measure(names: Sequence[str] = tuple(RUNS)) -> dict[str, list[float]]:
    """Run the pinned runs ``names`` in a scratch folder; their per-step losses."""
    with tempfile.TemporaryDirectory(prefix="sdt-golden-") as scratch:
        img, reg = write_data(Path(scratch) / "data")
        losses = {}
        for name in names:
            out = Path(scratch) / name
            RUNS[name](img, reg, out)
            losses[name] = read_losses(out / "logs")
        return losses


def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def measured(one_torch_thread) -> dict[str, list[float]]:
    return measure()


@pytest.mark.parametrize("name", list(RUNS))
def test_per_step_losses_match_the_golden_values(measured, name):
    expected = golden()
    assert expected["model_sha256"] == model_fingerprint(), (
        f"{MODEL_DIR} changed since the golden losses were recorded: if the new model is intended, run "
        "`python tools/update_golden_losses.py` (docs/testing.md)"
    )
    assert len(measured[name]) == STEPS
    assert measured[name] == pytest.approx(expected["runs"][name], rel=RELATIVE_TOLERANCE), (
        f"{name}: per-step losses moved; a change to noise, timesteps, targets, loss scaling or network application "
        "does this. Update on purpose only (docs/testing.md)"
    )


def test_the_golden_file_covers_every_run_with_distinct_losses():
    """Guards the file itself: every run pinned, the steps all different (a constant would pin nothing)."""
    runs = golden()["runs"]
    assert set(runs) == set(RUNS)
    for losses in runs.values():
        assert len(losses) == STEPS and len(set(losses)) == STEPS and all(0 < v < 10 for v in losses)
