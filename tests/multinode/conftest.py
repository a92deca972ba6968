"""Fixtures for the multi-node suite: two namespace hosts per test and one Fashion-MNIST shard set.

Every test here needs root (network namespaces); without it the whole directory skips with the reason.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runs import Shards
from twohosts import TwoHosts, remove_stale_namespaces

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


def _why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "multinode tests need root to create network namespaces (run `make test-multinode` as root)"
    if shutil.which("ip") is None:
        return "multinode tests need iproute2's `ip` to create network namespaces"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not_runnable()
    for item in items:
        if "tests/multinode/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.multinode)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _no_stale_namespaces() -> None:
    """Namespaces from an earlier run that was SIGKILLed (so its finalizers never ran) go first."""
    if _why_not_runnable() is None:
        remove_stale_namespaces()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Fresh hosts per test: a test that kills ranks cannot leave state for the next one."""
    hosts = TwoHosts(tag=f"{os.getpid()}-{next(_counter)}")
    try:
        yield hosts.create()
    finally:
        hosts.destroy()


def _brace(folder: Path, split: str) -> str:
    shards = sorted(folder.glob(f"fmnist-{split}-*.tar"))
    assert len(shards) >= 2, f"data_tools wrote {len(shards)} {split} shards into {folder}; expected >= 2"
    return str(folder / f"fmnist-{split}-{{000000..{len(shards) - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def fmnist_shards(fashion_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """Real Fashion-MNIST shards written once per session by data_tools and shared by every run.

    The 10k-image test split is enough for a few steps and quick to write; 10 % of it becomes the
    validation shards (2 of them: one per rank, as finite evaluation needs).
    """
    out = tmp_path_factory.mktemp("fmnist-shards")
    subprocess.run(
        [sys.executable, "-m", "data_tools.shard", "--src", str(fashion_mnist / "t10k-images-idx3-ubyte.gz"),
         "--out", str(out), "--prefix", "fmnist", "--samples-per-shard", "500", "--val-fraction", "0.1",
         "--no-progress"],
        check=True, cwd=REPO, timeout=180, capture_output=True)
    return Shards(train=_brace(out, "train"), val=_brace(out, "val"))
