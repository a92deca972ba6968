"""A write-only file that sha256-hashes its bytes as they are written, off the caller's thread.

The sharder hands it to webdataset's `TarWriter` as the output stream. `HashedFile` joins the
pieces into ~4 MiB batches and gives each to one background thread that hashes and writes it, in
order: hashlib and os.write release the GIL, so on a second core hashing and writing overlap the
caller's reading and checking of images, and nothing is read back to be hashed for the manifest.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

BATCH_BYTES = 4 << 20
MAX_PENDING_BATCHES = 3  # bounds the memory held for the writer thread: ~12 MiB


class HashedFile:
    """Append-only file whose sha256 and size are computed from the bytes as they are written."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.sha, self.size = hashlib.sha256(), 0
        self._pieces: list[bytes] = []
        self._pending_bytes = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._in_flight: deque[Future] = deque()

    def write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._pending_bytes += len(data)
        self.size += len(data)
        if self._pending_bytes >= BATCH_BYTES:
            self._submit()

    def tell(self) -> int:
        """Bytes written so far (tarfile's "w" mode asks where it starts)."""
        return self.size

    def _submit(self) -> None:
        if not self._pieces:
            return
        while len(self._in_flight) >= MAX_PENDING_BATCHES:
            self._in_flight.popleft().result()
        # One join per batch: the writer thread then needs the GIL twice per batch, where hashing
        # and writing the many small pieces there made both threads convoy on it (measured).
        self._in_flight.append(self._thread.submit(self._hash_and_write, b"".join(self._pieces)))
        self._pieces, self._pending_bytes = [], 0

    def _hash_and_write(self, batch: bytes) -> None:
        self.sha.update(batch)  # releases the GIL
        rest = memoryview(batch)
        while rest:  # a short write (signal, nearly full disk) continues where it stopped
            rest = rest[os.write(self.fd, rest):]

    def close_async(self, fsync: bool) -> Future:
        """Queue the rest, the optional fsync and the close behind the pending batches; the future
        gives the hex sha256 of everything written. The caller may start the next shard meanwhile:
        that is how a shard's fsync overlaps the next shard's work."""
        self._submit()
        earlier, self._in_flight = list(self._in_flight), deque()
        done = self._thread.submit(self._finish, fsync, earlier)
        self._thread.shutdown(wait=False)  # the queued tasks still run; the thread then exits
        return done

    def _finish(self, fsync: bool, earlier: list[Future]) -> str:
        try:
            for batch in earlier:  # already run (one thread, in order): re-raises a failed write
                batch.result()
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.sha.hexdigest()

    def close(self, fsync: bool) -> str:
        """Write what is left, optionally fsync, close; return the hex sha256 of everything written."""
        return self.close_async(fsync).result()

    def abort(self) -> None:
        """Stop without finishing; the caller deletes the temporary file (it may be what filled the disk)."""
        for future in self._in_flight:
            future.cancel()
        self._thread.shutdown(wait=True)
        os.close(self.fd)
