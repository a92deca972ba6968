"""Reading raw (undecoded) samples out of one shard.

Raw samples are dicts of bytes keyed by extension, plus `__key__`: cheap to skip, which is what
resume relies on (skipping never decodes). Members come from `data_tools.shard_format.iter_tar_files`
(webdataset's tar iteration plus an end-of-archive check) and are grouped into samples by
webdataset's `group_by_keys`. A shard that ends early, whether its tar is damaged or it holds
fewer samples than its manifest says, raises ShardReadError: the callers count it as a bad shard
instead of training or evaluating on part of it.
"""
from __future__ import annotations

from collections.abc import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from data_tools.shard_format import iter_tar_files


class ShardReadError(RuntimeError):
    """A shard could not be opened, its tar stream broke or it held the wrong number of samples;
    `samples_read` came out before that was known."""

    def __init__(self, url: str, samples_read: int, cause: BaseException | str) -> None:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{url}: unreadable after {samples_read} samples ({reason})")
        self.url, self.samples_read = url, samples_read


def iter_raw_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Samples of one shard (local path, `pipe:cmd`, http(s), ... as webdataset's gopen knows).

    `expected`: the shard's sample count from its manifest. A different count is a ShardReadError
    raised once the shard is exhausted (the samples before it were yielded: they are valid).
    """
    count = 0
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        raise ShardReadError(url, 0, e) from e
    try:
        members = ({**m, "__url__": url} for m in iter_tar_files(stream))
        for sample in group_by_keys(members):
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
