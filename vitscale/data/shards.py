"""Reading raw (undecoded) samples out of one shard.

Raw samples are dicts of bytes keyed by extension, plus `__key__`: cheap to skip, which is what
resume relies on (skipping never decodes). A shard that ends early, whether its tar is damaged or
it holds fewer samples than its manifest says, raises ShardReadError: the callers count it as a bad
shard instead of training or evaluating on part of it.

Members: `data_tools.shard_format.iter_tar_files` is the reference (webdataset's tar iteration plus
an end-of-archive check), but Python's tarfile spends ~40 us per member on header objects: 0.13 ms
of worker CPU per Fashion-MNIST sample (3 members), more than decoding its PNG. Local shards are
therefore read by `_plain_tar_members`, one `read` per header and per member, which understands
exactly the headers data_tools.shard and webdataset's TarWriter write (ustar / GNU regular files
and directories, checksum verified) and steps aside at anything else: a header it does not know,
a bad checksum, a short read, bytes after the end marker. The shard is then re-read from its
start by `iter_tar_files`, which skips the members already yielded and reports the damage with
its own words, so both paths yield the same members and raise the same errors.
Samples are grouped like webdataset's `group_by_keys` (key = path up to the first dot of the
file name, suffix lower-cased, a repeated suffix within one key is an error).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import IO

from webdataset.gopen import gopen

from data_tools.shard_format import iter_tar_files, local_path


class ShardReadError(RuntimeError):
    """A shard could not be opened, its tar stream broke or it held the wrong number of samples;
    `samples_read` came out before that was known."""

    def __init__(self, url: str, samples_read: int, cause: BaseException | str) -> None:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{url}: unreadable after {samples_read} samples ({reason})")
        self.url, self.samples_read = url, samples_read


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_REGULAR, _AREGULAR, _DIRECTORY = ord("0"), 0, ord("5")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # as iter_tar_files (webdataset's default)
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class _NotPlain(Exception):
    """`_plain_tar_members` met something it leaves to tarfile."""


def _field(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _octal(raw: bytes) -> int:
    if raw[:1] in (b"\x80", b"\xff"):  # base-256 (huge members): tarfile's business
        raise _NotPlain
    try:
        return int(_field(raw).strip() or b"0", 8)
    except ValueError:
        raise _NotPlain from None


def _plain_tar_members(f: IO[bytes]) -> Iterator[dict]:
    """`{"fname", "data"}` of each regular member, then the end check of `iter_tar_files` (zero
    blocks only after the end marker, at least two of them); `_NotPlain` at anything else."""
    read = f.read
    while True:
        header = read(_BLOCK)
        if len(header) != _BLOCK:
            raise _NotPlain
        if header == _ZERO_BLOCK:
            zeros = 0
            while chunk := read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise _NotPlain
                zeros += len(chunk)
            if zeros < _BLOCK:
                raise _NotPlain
            return
        # The checksum field counts as 8 spaces (256); summing without the zero bytes (most of a
        # header) is 2.3x faster and was 12 % of a loader worker's time on 28 px images.
        if _octal(header[148:156]) != 256 + sum(header.translate(None, b"\0")) - sum(header[148:156]):
            raise _NotPlain  # a damaged header (or signed checksums, which tarfile also accepts)
        kind, size = header[156], _octal(header[124:136])
        name = _field(header[:100])
        if header[257:265] == _POSIX_MAGIC and header[345] != 0:
            name = _field(header[345:500]) + b"/" + name
        regular = kind == _REGULAR or (kind == _AREGULAR and not name.endswith(b"/"))
        if not regular and not ((kind == _DIRECTORY or kind == _AREGULAR) and size == 0):
            raise _NotPlain  # links, pax / GNU long-name headers, sparse files, devices ...
        if regular:
            data = read(size)
            padding = -size % _BLOCK
            if len(data) != size or (padding and len(read(padding)) != padding):
                raise _NotPlain
            fname = name.decode("utf-8", "surrogateescape")
            if not _SKIP_META.match(fname):
                yield {"fname": fname, "data": data}


def _local_tar_members(f: IO[bytes]) -> Iterator[dict]:
    """`_plain_tar_members`, handing over to `iter_tar_files` (re-reading from the start) when it
    steps aside."""
    done = 0
    try:
        for member in _plain_tar_members(f):
            done += 1
            yield member
        return
    except _NotPlain:
        pass
    f.seek(0)
    for i, member in enumerate(iter_tar_files(f)):
        if i >= done:
            yield member


def _group(members: Iterator[dict], url: str) -> Iterator[dict]:
    """webdataset's `group_by_keys` (lower-cased suffixes, a repeated suffix raises) for one shard."""
    sample: dict | None = None
    for member in members:
        fname = member["fname"]
        match = _KEY_SUFFIX.match(fname)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{fname}: duplicate file name in tar file {suffix} {sample.keys()}")
        sample[suffix] = member["data"]
    if sample is not None:
        yield sample


def iter_raw_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Samples of one shard (local path, `pipe:cmd`, http(s), ... as webdataset's gopen knows).

    `expected`: the shard's sample count from its manifest. A different count is a ShardReadError
    raised once the shard is exhausted (the samples before it were yielded: they are valid).
    """
    count = 0
    path = local_path(url)
    try:
        stream = open(path, "rb", buffering=1 << 16) if path is not None else gopen(url, "rb")
    except Exception as e:
        raise ShardReadError(url, 0, e) from e
    try:
        members = _local_tar_members(stream) if path is not None else iter_tar_files(stream)
        for sample in _group(members, url):
            count += 1
            yield sample
    except ShardReadError:
        raise
    except Exception as e:
        raise ShardReadError(url, count, e) from e
    finally:
        stream.close()
    if expected is not None and count != expected:
        raise ShardReadError(url, count, f"{count} samples, manifest.json says {expected}")
