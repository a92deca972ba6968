"""The whole sample -> shard assignment, decided up front from the listing alone.

Planning in the parent, before any image is read, is what makes the output independent of
`--workers` (each worker writes whole shards of a fixed plan) and what makes resume safe
(a shard on disk is reused only if it was written from the identical plan entry).
Rejected inputs are dropped inside their shard, which then is shorter; no other shard moves.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from data_tools.sources import Item

TOOL_VERSION = "3"  # 3: 16-bit PNG scaled to 8 bits, listing errors in shards; 2: GNU tar headers (1: PAX)
"""Bumped whenever shard bytes for the same input and options would change (resume compares it)."""
TAR_BLOCK = 512
KEY_STEM_CHARS = 48  # keeps `key.ext` inside the 100-character ustar name field


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    name: str
    items: tuple[Item, ...]
    digest: str  # identifies (items, options, tool version): resume reuses a shard only on a match


def sample_key(item: Item) -> str:
    """`<listing index>_<sanitised file stem>`: unique, readable, and free of the dots and
    slashes that WebDataset would read as extension or directory separators."""
    stem = item.ref.rsplit("/", 1)[-1].split(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:KEY_STEM_CHARS]
    return f"{item.index:09d}_{stem}" if stem else f"{item.index:09d}"


def in_val_split(item: Item, fraction: float, seed: int) -> bool:
    """Hash of (seed, path), not a position in a permutation: adding images to the corpus later
    never moves an existing image between train and val, so re-sharding cannot leak val."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(f"{seed}\0{item.ref}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def planned_bytes(item: Item) -> int:
    """Tar bytes a sample will take: image member + `cls` + `json` (one header and block each)."""
    body = -(-item.size // TAR_BLOCK) * TAR_BLOCK
    return TAR_BLOCK + body + 2 * (2 * TAR_BLOCK)


def plan_shards(
    items: list[Item],
    *,
    prefix: str,
    samples_per_shard: int,
    max_shard_bytes: int | None,
    val_fraction: float,
    seed: int,
    shuffle: bool,
    options: dict,
) -> list[ShardPlan]:
    """Split, shuffle (seeded; Python's `random` is stable across versions) and cut into shards.

    Names: `<prefix>-NNNNNN.tar` without a val split, else `<prefix>-train-NNNNNN.tar` and
    `<prefix>-val-NNNNNN.tar`. A shard closes at `samples_per_shard` samples or before the next
    sample would push it past `max_shard_bytes` (a shard always takes at least one sample).
    """
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    splits = {"train": [], "val": []}
    for it in items:
        splits["val" if in_val_split(it, val_fraction, seed) else "train"].append(it)
    plans: list[ShardPlan] = []
    for split, members in splits.items():
        if not members:
            continue
        if shuffle:
            members = list(members)
            random.Random(f"{seed}:{split}").shuffle(members)
        stem = f"{prefix}-{split}" if val_fraction > 0 else prefix
        for index, chunk in enumerate(_cut(members, samples_per_shard, max_shard_bytes)):
            name = f"{stem}-{index:06d}.tar"
            plans.append(ShardPlan(split, index, name, tuple(chunk), _digest(name, chunk, options)))
    return plans


def _cut(members: list[Item], per_shard: int, max_bytes: int | None) -> list[list[Item]]:
    shards: list[list[Item]] = []
    current: list[Item] = []
    used = 0
    for it in members:
        cost = planned_bytes(it)
        if current and (len(current) >= per_shard or (max_bytes and used + cost > max_bytes)):
            shards.append(current)
            current, used = [], 0
        current.append(it)
        used += cost
    if current:
        shards.append(current)
    return shards


def _digest(name: str, items: list[Item], options: dict) -> str:
    h = hashlib.sha256(json.dumps([TOOL_VERSION, name, options], sort_keys=True).encode())
    for it in items:
        h.update(f"{it.ref}\t{it.size}\t{it.label}\t{json.dumps(it.extra, sort_keys=True)}{it.error}\n".encode())
    return h.hexdigest()


def brace_pattern(names: list[str]) -> str:
    """`data-train-{000000..000041}.tar` for the config's `train_shards` (WebDataset brace syntax)."""
    if len(names) == 1:
        return names[0]
    stem = names[0].rsplit("-", 1)[0]
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    return f"{stem}-{{{first}..{last}}}.tar"
