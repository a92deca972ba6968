"""Fixtures for the multi-node suite: two namespace hosts per test and one Fashion-MNIST shard set.

Every test here needs root (network namespaces); without it the whole directory skips with the reason.
"""
from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator

import pytest

from twohosts import TwoHosts, remove_stale_namespaces

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
