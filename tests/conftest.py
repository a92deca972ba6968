"""Shared fixtures: real images shipped offline, and small settings every test can use."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _foolbox_data() -> Path | None:
    spec = importlib.util.find_spec("foolbox")  # located, never imported: we only read its files
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def foolbox_data() -> Path:
    """20 real ImageNet JPEGs + 20 CIFAR/MNIST PNGs (installed by `make setup`)."""
    path = _foolbox_data()
    if path is None:
        pytest.fail("foolbox data missing: run `make setup` (installs foolbox==3.3.4 --no-deps)")
    return path


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """Real Fashion-MNIST IDX files; `make fmnist` installs the Debian package."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (needs root: `make fmnist`)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Small ops on shared, busy cores: one intra-op thread avoids spin-wait contention (3.5 s -> 0.25 s
    for a tiny hybrid forward measured on this machine under load). Use with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite store: creating one costs seconds, copying it milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
