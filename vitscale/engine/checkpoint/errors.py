"""Checkpoint errors: each carries one line that names the file or directory, what was found and what
was expected, so the entry point can print it without a traceback (docs/training.md, "Checkpoints")."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; ``str(err)`` is one line naming the file or directory."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match its checksum manifest (or the manifest is missing/unreadable)."""


class UnsafeCheckpointError(CheckpointError):
    """A file needs a Python global outside the allow-list to unpickle: it is refused, never executed."""


class NoSpaceError(CheckpointError):
    """The file system holding the checkpoint directory is full (or over quota)."""


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace and cut ``text`` so a message stays on one readable line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
