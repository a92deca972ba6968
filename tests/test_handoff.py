"""The background hand-off (vitscale.data.handoff): order, errors in place, and a thread that stops."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from vitscale.data.handoff import received_in_background


def _threads() -> int:
    return sum(t.name == "vitscale-handoff" for t in threading.enumerate())


def test_items_come_in_order_and_received_ahead() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i

    items = received_in_background(source(), depth=2)
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:  # 1 taken + 2 queued + 1 waiting to be put
        time.sleep(0.01)
    assert len(produced) == 4  # ahead by the queue depth, no further
    assert list(items) == list(range(1, 10))


def test_an_error_is_raised_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("shard 7 unreadable")

    items = received_in_background(source())
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(ValueError, match="shard 7 unreadable"):
        next(items)


def test_closing_stops_the_thread() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    before = _threads()
    items = received_in_background(endless(), depth=3)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert _threads() == before + 1
    items.close()
    assert _threads() == before
