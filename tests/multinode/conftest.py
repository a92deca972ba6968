"""Fixtures for the multi-node suite: two namespace hosts per test and one Fashion-MNIST shard set.

Every test here needs root (network namespaces); without it the whole directory skips with the reason.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runs import Shards
from twohosts import TwoHosts, namespaces_unavailable, remove_stale_namespaces

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if "tests/multinode/" in str(item.path).replace(os.sep, "/")]
    if not ours:
        return
    reason = namespaces_unavailable()
    for item in ours:
        item.add_marker(pytest.mark.multinode)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"multinode: {reason}"))
    if reason is None:
        # Namespaces of an earlier session that was SIGKILLed (its finalizers never ran) go first.
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
    done = subprocess.run(
        [sys.executable, "-m", "data_tools.shard", "--src", str(fashion_mnist / "t10k-images-idx3-ubyte.gz"),
         "--out", str(out), "--prefix", "fmnist", "--samples-per-shard", "500", "--val-fraction", "0.1",
         "--no-progress"],
        cwd=REPO, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, f"data_tools.shard failed:\n{done.stdout}\n{done.stderr}"
    return Shards(train=_brace(out, "train"), val=_brace(out, "val"))
