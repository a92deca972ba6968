"""What a source lists: one Item per input image, and the error a source raises.

Apart from data_tools.sources so that source kinds in their own modules (data_tools.cifar_source)
and the source dispatcher can both import them without an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SourceError(ValueError):
    """The source cannot be listed (bad path, bad manifest row, mismatched IDX files)."""


@dataclass(frozen=True)
class Item:
    """One input image as listed, before it is read.

    `size` is the byte size the shard plan budgets for: the file size for files on disk
    (exact for pass-through), an upper-bound estimate for IDX images encoded on the fly.
    `error`: why the listing could not use this entry (unreadable folder, dangling symlink, ...);
    the writer rejects it into errors.jsonl with that reason instead of reading it.
    """

    index: int
    ref: str
    label: int
    size: int
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    error: str = ""
