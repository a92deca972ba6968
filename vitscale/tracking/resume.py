"""`resume=runs:/RUN_ID`: the DeepSpeed checkpoint of an MLflow run, as a local directory.

The run's own output_dir when this machine reaches it (shared disk), else the checkpoint artifacts
the run uploaded (`tracking.log_checkpoints=true`), downloaded once into the cache. Which tag to load,
and whether it is intact, is the engine's decision (vitscale.engine.checkpoint verifies manifests).
"""
from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from vitscale.tracking.cache import cache_root as _cache_root
from vitscale.engine.checkpoint.layout import LATEST, has_checkpoint, latest_tag
from vitscale.tracking.cache import download_once as _download_once
from vitscale.tracking.reach import (
    DEFAULT_TIMEOUT_S, TrackingUnreachable, auth_error, fast_fail_http, server_of, unreachable_reason,
)
from vitscale.tracking.registry import CHECKPOINT_ARTIFACT_DIR, OUTPUT_DIR_TAG, ResolvedCheckpoint, _get_run
from vitscale.tracking.stores import TrackingNotFound, describe_store, require_store
from vitscale.tracking.uris import LocalURI, RunURI, parse_uri, resolve_tracking_uri


def _local_checkpoint_root(path: Path) -> Path | None:
    """A folder holding checkpoints: a `latest` file, or tag folders with a checksum manifest."""
    for root in (path, path / CHECKPOINT_ARTIFACT_DIR):
        if has_checkpoint(root):
            return root
    return None


def _latest_tag(root: Path) -> str:
    return latest_tag(root) or ""


def resolve_resume(
    uri: str | Path, *, dst: Path | None = None, tracking_uri: str | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> ResolvedCheckpoint:
    """Local DeepSpeed checkpoint root to resume from, for runs:/RUN_ID or a local path. `tag` is what
    `latest` names ("" without one); the engine verifies checksums and picks among the tags itself.

    For a run, its recorded output_dir is used when it is reachable from this machine (shared disk;
    extra["source"] == "output_dir"); otherwise the run's `checkpoints/` artifacts
    (Tracker.log_checkpoint) are downloaded. A server that does not answer within `timeout_s` raises
    TrackingUnreachable (one line naming it).
    """
    parsed = parse_uri(uri)
    if isinstance(parsed, LocalURI):
        root = _local_checkpoint_root(parsed.path)
        if root is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {parsed.path}: expected a folder holding "
                                    f"'latest' (or {CHECKPOINT_ARTIFACT_DIR}/latest)")
        return ResolvedCheckpoint(root, _latest_tag(root))
    if not isinstance(parsed, RunURI):
        raise ValueError(f"resume URI {uri!r} must be runs:/RUN_ID or a local checkpoint folder")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    require_store(tracking_uri, f"resolving resume={uri}")  # not an empty store created in passing
    try:
        with fast_fail_http(timeout_s):
            return _resume_from_run(parsed, dst, MlflowClient(tracking_uri=tracking_uri))
    except Exception as exc:  # noqa: BLE001 - only outages are rewritten; everything else re-raised
        reason = unreachable_reason(exc)
        if reason is None:
            raise auth_error(exc, server_of(tracking_uri), f"resolving resume={uri}") or exc
        raise TrackingUnreachable(f"MLflow server {server_of(tracking_uri)} unreachable ({reason}, {timeout_s}s "
                                  f"timeout) while resolving resume={uri}; start the server or resume from a "
                                  f"local checkpoint path") from None


def _resume_from_run(parsed: RunURI, dst: Path | None, client: MlflowClient) -> ResolvedCheckpoint:
    run = _get_run(client, parsed.run_id)
    output_dir = run.data.tags.get(OUTPUT_DIR_TAG)
    if output_dir and not parsed.path:
        root = _local_checkpoint_root(Path(output_dir))
        if root is not None:
            return ResolvedCheckpoint(root, _latest_tag(root), parsed.run_id, {"source": "output_dir"})
    prefix = parsed.path or CHECKPOINT_ARTIFACT_DIR
    names = {Path(f.path).name for f in client.list_artifacts(parsed.run_id, prefix)}
    if LATEST not in names:
        raise TrackingNotFound(f"run {parsed.run_id} has no DeepSpeed checkpoint: output_dir {output_dir!r} "
                               f"has none here and there is no {prefix}/latest artifact in the store "
                               f"{describe_store(client.tracking_uri)}")
    final = Path(dst) if dst else _cache_root() / "runs" / parsed.run_id / "resume"
    latest_dir = Path(download_artifacts(run_id=parsed.run_id, artifact_path=f"{prefix}/{LATEST}",
                                         dst_path=str(final.parent / ".latest"), tracking_uri=client.tracking_uri))
    tag = latest_dir.read_text().strip()
    target = final / tag
    _download_once(lambda tmp: download_artifacts(run_id=parsed.run_id, artifact_path=f"{prefix}/{tag}",
                                                  dst_path=str(tmp), tracking_uri=client.tracking_uri), target)
    (final / LATEST).write_text(tag)
    return ResolvedCheckpoint(final, tag, parsed.run_id, {"source": "artifacts"})
