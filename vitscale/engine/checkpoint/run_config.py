"""The resolved training config stored in every checkpoint, and the comparison ``resume=auto`` makes.

``resume=auto`` continues whatever run left checkpoints in ``output_dir``. Reusing an output_dir with
a changed recipe (another LR, model, data set) would silently graft the new config onto the old
run's weights and optimizer, so the comparison refuses it, naming the keys, unless only keys that
may legitimately change between the two halves of one run differ (``MAY_CHANGE``). An explicitly
named checkpoint (``resume=PATH``, ``runs:/ID``) is the user's deliberate choice: the same
differences are a warning there, not an error.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import yaml

from vitscale.config import ConfigError
from vitscale.engine.checkpoint.errors import CheckpointError

CONFIG_FILE = "train_config.yaml"  # <tag>/train_config.yaml, listed (and checksummed) in the manifest

# Dotted keys (fnmatch patterns) that may differ between a checkpoint and the run resuming it:
# how long and how often (steps, intervals), where (output paths, data shard locations), how it is
# observed (tracking, evaluation), and how it is laid out on machines (micro-batch, loader workers,
# activation checkpointing, timeouts, bad-shard tolerance). The world size is not a config key.
MAY_CHANGE: tuple[str, ...] = (
    "name", "output_dir", "resume",
    "trainer.max_steps", "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.micro_batch_size", "trainer.activation_checkpointing.*", "trainer.dist_timeout_s",
    "trainer.export_at_end", "trainer.peak_flops", "trainer.nan_patience",
    "eval.*", "tracking.*",
    "data.num_workers", "data.train_shards", "data.val_shards", "data.max_bad_shards",
)


class ResumeConfigError(ConfigError, CheckpointError):
    """resume=auto found a checkpoint of a run with another config (the entry point exits 2)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}; lists are leaves (a changed shard list is one key)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only), except those in MAY_CHANGE."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _ABSENT) != b.get(k, _ABSENT))
    return [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in MAY_CHANGE)]


_ABSENT = object()


def read_saved(tag_dir: Path) -> dict[str, Any] | None:
    """The config a checkpoint was written with; None for checkpoints from before it was stored."""
    path = tag_dir / CONFIG_FILE
    if not path.is_file():
        return None
    body = yaml.safe_load(path.read_text())
    return body if isinstance(body, dict) else None


def describe(keys: list[str], saved: dict[str, Any], current: dict[str, Any], limit: int = 6) -> str:
    a, b = flatten(saved), flatten(current)
    shown = [f"{k} ({_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))})" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mismatch_line(what: str, tag_dir: Path, keys: list[str], saved: dict[str, Any], current: dict[str, Any],
                  output_dir: Path) -> str:
    return (f"{what}: checkpoint {tag_dir} was written by a run whose config differs in "
            f"{describe(keys, saved, current)}; to start a new run here pass resume=null (the old checkpoints "
            f"are kept), or give it a new output_dir (currently {output_dir})")
