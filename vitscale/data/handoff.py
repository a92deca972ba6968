"""How batches get from DataLoader workers to the step without the step paying for the hand-off.

Why: taking a batch from a DataLoader worker is not free even when the batch is ready. Every
tensor arrives as a shared-memory file descriptor that the main process must fetch from the
worker over a socket (a connect, an authentication round trip, a recvmsg per storage), and on a
busy host the worker process must first be scheduled to answer. On 2 CPU ranks sharing 2 cores
with their workers this measured ~3.5 ms of a 61 ms step (py-spy: 5 % of a rank's time inside
`DataLoader.__next__`, mostly `rebuild_storage_fd`), time the rank's core sat idle. On CUDA hosts
torch's own pin-memory thread already receives in the background; on CPU hosts nothing does, and
this module is that thread.

The thread only calls `next()` on an iterator created in the main thread (so torch's SIGCHLD
handler for dead workers is installed there); items and exceptions come out in order, and
nothing is consumed on the caller's behalf that it did not take: bookkeeping that depends on
what training used (stream positions for exact resume) stays with the consumer.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
_END = object()
PICKLE_BELOW = 1 << 20  # bytes of uint8 pixels per batch (`for_transfer`)


def for_transfer(images: torch.Tensor) -> torch.Tensor | np.ndarray:
    """How a batch leaves its worker. A tensor travels in shared memory, which costs the main
    process a file-descriptor handshake with the worker per storage (~1 ms, more when the worker
    must first be scheduled on a busy host); below `PICKLE_BELOW` bytes copying the pixels through
    the worker's pipe is cheaper (a numpy array, which DataLoader leaves alone with `as_is`)."""
    return images.numpy() if images.numel() * images.element_size() < PICKLE_BELOW else images


def as_is(item: dict) -> dict:
    """DataLoader's collate_fn: items are complete batches; keep numpy arrays as they are."""
    return item


def received_in_background(items: Iterator[T], depth: int = 2, name: str = "vitscale-handoff") -> Iterator[T]:
    """Yield what `items` yields, `depth` items received ahead by a daemon thread. Closing the
    generator (or dropping it) stops the thread at its next item; an exception in `items` is
    raised here, at the position it happened."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def receive() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, _END))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=receive, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if ok:
                yield item  # type: ignore[misc]
            elif item is _END:
                return
            else:
                raise item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5.0)
