"""Shared fixtures: tiny models built in code and real image files on disk."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tiny tensors gain nothing from intra-op threads, and training subprocesses would oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short temporary folder per test, removed afterwards. Error messages echo paths cut at 80 characters, and
    pytest's own folders (longer still under pytest-xdist's per-worker roots) would cut the paths tests expect."""
    path = Path(tempfile.mkdtemp(prefix="sdt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they thrash (20x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its settings process-wide: forget them after each test that made an Accelerator, so a later
    test may pick another precision."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


@pytest.fixture
def tiny_sd1():
    from library.models.tiny import make_tiny_model

    return make_tiny_model(v2=False)


@pytest.fixture
def tiny_sd2():
    from library.models.tiny import make_tiny_model

    return make_tiny_model(v2=True)


@pytest.fixture(scope="module")
def sd1():
    """The tiny SD1 model, built once per test module, for tests that only read it."""
    from library.models.tiny import make_tiny_model

    return make_tiny_model(v2=False)


@pytest.fixture(scope="module")
def sd2():
    """The tiny SD2 (v-prediction) model, built once per test module, for tests that only read it."""
    from library.models.tiny import make_tiny_model

    return make_tiny_model(v2=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny SD1 model saved as a diffusers folder, once per test module."""
    from tests.training import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    """The tiny SDXL model saved once per module as a diffusers folder (what the sdxl_* scripts are pointed at)."""
    from library.models.family import family_named
    from library.models.save import save_model
    from library.models.tiny import tiny_model
    from tests.training import hub_tokenizer_files

    folder = tmp_path_factory.mktemp("model") / "sdxl"
    return hub_tokenizer_files(save_model(tiny_model(family_named("sdxl")), folder, "diffusers_safetensors"))
