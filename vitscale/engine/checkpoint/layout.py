"""The checkpoint directory layout, owned here and nowhere else (no torch, no DeepSpeed: tracking and
launch read it too)::

    <root>/latest                  the newest complete tag, moved only after its manifest
    <root>/step_00000123/          one DeepSpeed tag: its files, rank_<r>.pt, train_config.yaml,
                                   manifest.json (written last: a tag without it is incomplete)
    <root>/replaced/               tag directories this job did not write, moved aside, never overwritten

``<root>`` is ``output_dir/checkpoints`` for a training run.
"""
from __future__ import annotations

import re
from pathlib import Path

TAG_PREFIX = "step_"
TAG_RE = re.compile(r"step_(\d{8})")
LATEST = "latest"
MANIFEST = "manifest.json"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int | None:
    """The step a tag names (``step_00000123`` -> 123); None for a name that is not a tag."""
    match = TAG_RE.fullmatch(tag)
    return int(match.group(1)) if match else None


def tags(root: Path) -> list[str]:
    """Tag directories under ``root``, oldest first (``step_NNNNNNNN`` sorts by step)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG_RE.fullmatch(p.name) and p.is_dir())


def latest_tag(root: Path) -> str | None:
    """What ``root/latest`` names (not verified), None without the file."""
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def has_checkpoint(root: Path) -> bool:
    """Whether ``root`` holds something ``resume=auto`` would consider: a ``latest`` file or a tag
    with a manifest (resume=auto does not need ``latest``)."""
    return (root / LATEST).is_file() or any((root / t / MANIFEST).is_file() for t in tags(root))
