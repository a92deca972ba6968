"""What a run was made from: code version, data fingerprint, and its config as MLflow params.

These become run tags/params so two runs can be compared without opening their folders.
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:  # MLflow's own limits, so a newer server's larger limits are used when installed
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - very old MLflow
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH = 250, 500

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def git_commit(path: Path = PACKAGE_DIR) -> tuple[str, bool] | None:
    """(commit sha, dirty) of the checkout holding the code, or None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha, bool(status.strip())) if sha else None


def _shard_dirs(shards: Any) -> Iterable[Path]:
    """Directories of shard URL patterns (brace ranges and `::`-joined lists allowed)."""
    if shards is None:
        return []
    items = [shards] if isinstance(shards, str) else list(shards)
    out = []
    for item in items:
        for url in str(item).split("::"):
            url = re.sub(r"^file://", "", url.strip())
            if url and "://" not in url and not url.startswith("pipe:"):
                out.append(Path(url).parent)
    return out


def manifest_fingerprint(manifest: Path) -> str | None:
    """The source fingerprint recorded by data_tools in manifest.json (None if absent/unreadable)."""
    try:
        data = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    for key in ("source_fingerprint", "fingerprint"):
        if isinstance(data.get(key), str):
            return data[key]
    source = data.get("source")
    if isinstance(source, dict) and isinstance(source.get("fingerprint"), str):
        return source["fingerprint"]
    return None


def data_fingerprints(data_cfg: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags `data.<split>_fingerprint` for every split whose shard folder has a manifest.json."""
    tags: dict[str, str] = {}
    if not data_cfg:
        return tags
    for split in ("train", "val", "test"):
        for folder in _shard_dirs(data_cfg.get(f"{split}_shards")):
            fp = manifest_fingerprint(folder / "manifest.json")
            if fp:
                tags[f"data.{split}_fingerprint"] = fp
                break
    return tags


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} within MLflow's key/value limits.

    Lists stay one param (JSON) because a per-index param is unreadable in the UI. Over-long values
    are cut with a marker; the full config is always logged as config/config.yaml too.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            marker = "...[truncated; see config/config.yaml]"
            text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
        flat[name[:MAX_ENTITY_KEY_LENGTH]] = text
    return flat
