"""The local download cache for resolved weights, and its index of what each URI resolved to.

Downloads land under $VITSCALE_CACHE (default ~/.cache/vitscale). ``resolved.json`` remembers, per
(tracking server, URI), the directory and registered version a successful resolution produced, so
that with the server down a fine-tune can start from the copy it already has, saying so (an alias
may have moved since: the warning gives the date of the resolution it reuses).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

INDEX = "resolved.json"


def cache_root() -> Path:
    return Path(os.environ.get("VITSCALE_CACHE", Path.home() / ".cache" / "vitscale"))


def safe_part(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", part)


def download_once(fetch: Callable[[Path], Any], final: Path) -> Path:
    """Download via `fetch(tmp_dir) -> path inside tmp` into `final` atomically; reuse it if present.

    Concurrent ranks/jobs each download into their own temp sibling and `os.replace` it into place,
    so a half-written directory is never visible and a second caller reuses the first one's copy.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        got = Path(fetch(tmp))
        try:
            os.replace(got, final)
        except OSError:  # another process finished first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _key(server: str, uri: str) -> str:
    return f"{server} {uri}"


def remember(server: str, uri: str, path: Path, **details: str | None) -> None:
    """Record a successful resolution (atomic rewrite; ranks writing the same entry race harmlessly)."""
    index = cache_root() / INDEX
    try:
        entries = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    entries[_key(server, uri)] = {"path": str(Path(path).resolve()), "resolved_at": time.strftime("%Y-%m-%d %H:%M"),
                                  **{k: v for k, v in details.items() if v is not None}}
    index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}-", dir=index.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(entries, fh, indent=1, sort_keys=True)
    os.replace(tmp, index)


def recall(server: str, uri: str) -> dict[str, str] | None:
    """The entry ``remember`` wrote for this server and URI, if its directory still exists."""
    index = cache_root() / INDEX
    try:
        entry = json.loads(index.read_text()).get(_key(server, uri)) if index.is_file() else None
    except (OSError, ValueError):
        return None
    if not entry or not Path(entry.get("path", "")).is_dir():
        return None
    return entry
