"""Shard lists checked before any worker starts: missing files, shards their manifest does not
list or whose size differs from it, and (validation) too few shards for the readers.

Why up front: the training stream draws shards at random, so a missing file could go unnoticed
for a whole run (a 2-shard list with one file missing trained to the end with exit 0), and the
validation pass may start hours into a run. Only `stat` calls and one read of each folder's
manifest.json: cheap for 10^4 shards. Sample counts cannot be checked without reading every
shard; they are checked as each shard is read (`iter_raw_samples(url, expected)`), and the counts
found here are what those checks compare against.

Remote URLs (pipe:, http(s), s3, ...) are not checked here; the readers count their failures.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from data_tools.shard_format import ManifestError, local_path, shard_manifest_entries
from vitscale.data.config import DataConfig, expand_shards, parse_data_config

log = logging.getLogger(__name__)


class ShardListError(ValueError):
    """A shard list that cannot be used; the message names the key, the files and the counts."""


@dataclass(frozen=True)
class ShardList:
    """A checked shard list: `expected[url]` is the sample count its manifest states (absent
    where no manifest covers the shard); `problems` are those tolerated by max_bad_shards."""

    key: str
    urls: list[str]
    expected: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    remote: int = 0

    def expected_total(self, urls: list[str] | None = None) -> int | None:
        """Samples the manifests list for `urls` (default: all), None if any is not covered."""
        urls = self.urls if urls is None else urls
        if any(u not in self.expected for u in urls):
            return None
        return sum(self.expected[u] for u in urls)


def check_shard_list(urls: list[str], *, key: str, max_bad_shards: int = 0) -> ShardList:
    """Every local shard exists as a file, and where a data_tools manifest.json sits beside it,
    is listed there with the same byte size. More than `max_bad_shards` problems: ShardListError
    (first five named); fewer are logged, and the readers count them again when drawn."""
    if not urls:
        raise ShardListError(f"data.{key}: no shards given (expected a brace pattern or a list of tar files)")
    try:
        entries = shard_manifest_entries(urls)
    except ManifestError as e:
        raise ShardListError(f"data.{key}: {e}") from None
    problems: list[str] = []
    expected: dict[str, int] = {}
    remote = 0
    for url in urls:
        path = local_path(url)
        if path is None:
            remote += 1
            continue
        try:
            size = path.stat().st_size
            is_file = path.is_file()
        except OSError as e:
            problems.append(f"{url}: {e.strerror or e}")
            continue
        if not is_file:
            problems.append(f"{url}: not a file")
            continue
        if url not in entries:
            continue  # no manifest beside it: counted only by the tar end check
        entry = entries[url]
        if entry is None:
            problems.append(f"{url}: not listed in {path.parent / 'manifest.json'} (a stale shard of another run?)")
        elif size != entry.get("bytes", size):
            problems.append(f"{url}: {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced?)")
        else:
            expected[url] = int(entry["num_samples"])
    if len(problems) > max_bad_shards:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ShardListError(f"data.{key}: {len(problems)} of {len(urls)} shards unusable, more than "
                             f"data.max_bad_shards={max_bad_shards}: {shown}")
    for problem in problems:
        log.error("data.%s: %s (tolerated: data.max_bad_shards=%d)", key, problem, max_bad_shards)
    return ShardList(key, list(urls), expected, problems, remote)


def check_train_shards(cfg_data: Mapping | DataConfig | Any) -> ShardList:
    """`data.train_shards` checked up front (build_train_loader calls it)."""
    cfg = cfg_data if isinstance(cfg_data, DataConfig) else parse_data_config(cfg_data)
    return check_shard_list(cfg.train_shards, key="train_shards", max_bad_shards=cfg.max_bad_shards)


def check_val_shards(cfg_data: Mapping | DataConfig | Any, *, world_size: int, num_workers: int | None = None,
                     urls: Any = None, max_bad_shards: int | None = None, key: str = "val_shards") -> ShardList:
    """`data.val_shards` (or `urls`) checked at start-up, long before the first evaluation:
    every reader (rank x worker) needs a shard, or ranks finish unevenly and DDP hangs; files
    exist and match their manifest. `num_workers` / `max_bad_shards` default to the config's."""
    cfg = cfg_data if isinstance(cfg_data, DataConfig) else (
        parse_data_config(cfg_data) if cfg_data is not None else None)
    shards = expand_shards(urls, key) if urls is not None else (cfg.val_shards if cfg else [])
    workers = num_workers if num_workers is not None else (cfg.num_workers if cfg else 0)
    readers = world_size * max(1, workers)
    if shards and len(shards) < readers:
        raise ShardListError(
            f"data.{key}: {len(shards)} shards for {world_size} ranks x {max(1, workers)} workers = {readers} "
            "readers; every reader needs a shard or ranks finish unevenly and DDP hangs: reshard with a "
            "smaller --samples-per-shard or use fewer eval workers")
    if max_bad_shards is None:
        max_bad_shards = cfg.max_bad_shards if cfg else 0
    return check_shard_list(shards, key=key, max_bad_shards=max_bad_shards)
