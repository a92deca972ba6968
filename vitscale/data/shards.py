"""Reading raw (undecoded) samples out of one shard with webdataset's own tar iteration.

Raw samples are dicts of bytes keyed by extension, plus `__key__`: cheap to skip, which is what
resume relies on (skipping never decodes).
"""
from __future__ import annotations

from collections.abc import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator


class ShardReadError(RuntimeError):
    """A shard could not be opened or its tar stream broke; `samples_read` came out before that."""

    def __init__(self, url: str, samples_read: int, cause: BaseException) -> None:
        super().__init__(f"{url}: unreadable after {samples_read} samples ({type(cause).__name__}: {cause})")
        self.url, self.samples_read = url, samples_read


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Samples of one shard (local path, `pipe:cmd`, http(s), ... as webdataset's gopen knows)."""
    count = 0
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        raise ShardReadError(url, 0, e) from e
    try:
        members = ({**m, "__url__": url} for m in tar_file_iterator(stream))
        for sample in group_by_keys(members):
            count += 1
            yield sample
    except ShardReadError:
        raise
    except Exception as e:
        raise ShardReadError(url, count, e) from e
    finally:
        stream.close()
