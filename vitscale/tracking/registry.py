"""Model registry: publish a consolidated export as a model version, and turn URIs back into local files.

A registered version points at a plain artifact directory (model.safetensors + model_config.json +
train_config.yaml), not an MLflow "logged model": any tool can read safetensors, and MLflow 3's
`mlflow.register_model` refuses plain directories, so versions are created with MlflowClient directly.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from vitscale.tracking.cache import cache_root as _cache_root
from vitscale.tracking.cache import download_once as _download_once
from vitscale.tracking.cache import recall, remember
from vitscale.tracking.cache import safe_part as _safe
from vitscale.tracking.lineage import newest_version
from vitscale.tracking.reach import (
    DEFAULT_TIMEOUT_S, TrackingUnreachable, auth_error, fast_fail_http, server_of, unreachable_reason,
)
from vitscale.tracking.stores import TrackingNotFound, describe_store, require_store, uri_origin
from vitscale.tracking.uris import URI_FORMS, LocalURI, ModelURI, RunURI, parse_uri, resolve_tracking_uri

log = logging.getLogger("vitscale.tracking")
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.yaml"
REQUIRED_EXPORT_FILES = (WEIGHTS_FILE, MODEL_CONFIG_FILE)
EXPORT_ARTIFACT_DIR = "export"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"
OUTPUT_DIR_TAG = "vitscale.output_dir"
BEST_ALIAS = "best"
LATEST = "latest"  # reserved by MLflow: always the newest version, never stored as an alias


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def stored_aliases(self) -> tuple[str, ...]:
        """The aliases set in the registry (`aliases` also lists `latest`, which MLflow resolves to the
        newest version without storing it, so the UI never shows it)."""
        return tuple(a for a in self.aliases if a != LATEST)

    def describe(self) -> str:
        """For logs: what the registry will show, and that @latest reaches this version for now."""
        stored = ", ".join(f"@{a}" for a in self.stored_aliases) or "none"
        return f"{self.uri} (aliases: {stored}; models:/{self.name}@latest resolves to it while it is the newest)"


@dataclass(frozen=True)
class ResolvedWeights:
    """A local export directory plus where it came from (for the fine-tune run's lineage tags).

    Path-like (`os.fspath`, `/`), so callers that only want the directory can treat it as one.
    """

    path: Path
    uri: str
    model_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    cached_at: str | None = None  # set when the server was down and an earlier resolution was reused

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def lineage_tags(self) -> dict[str, str]:
        tags = {"finetune.source_uri": self.uri}
        if self.cached_at:
            tags["finetune.source_cached_at"] = self.cached_at
        if self.model_name:
            tags |= {"finetune.source_model": self.model_name, "finetune.source_version": str(self.version)}
        if self.run_id:
            tags["finetune.source_run_id"] = self.run_id
        if not self.model_name and not self.run_id:
            tags["finetune.source_path"] = str(self.path.resolve())
        return tags


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A local DeepSpeed checkpoint root (holding `latest` and `<tag>/`) and the run it belongs to."""

    path: Path
    tag: str
    run_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other


# ---------------------------------------------------------------------------------------------- publish
def check_export_dir(export_dir: Path) -> None:
    missing = [f for f in REQUIRED_EXPORT_FILES if not (Path(export_dir) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"export directory {export_dir} lacks {', '.join(missing)} "
                                f"(expected {' + '.join(REQUIRED_EXPORT_FILES)} [+ {TRAIN_CONFIG_FILE}])")


def _is_better(new: float, old: float | None, mode: str) -> bool:
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if mode == "max" else new < old


def _version_metric(client: MlflowClient, name: str, alias: str, metric: str) -> float | None:
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    try:
        return float(version.tags[f"metric.{metric}"])
    except (KeyError, ValueError):
        return None


def register_export(
    client: MlflowClient,
    run_id: str,
    export_dir: Path,
    name: str,
    *,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    best_metric: str | None = None,
    mode: str = "max",
    aliases: Iterable[str] = (),
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
) -> RegisteredVersion:
    """Log `export_dir` to the run, create a version of `name`, point `aliases` (and maybe `best`) at it.

    `latest` needs no alias: MLflow reserves the name and `models:/NAME@latest` resolves to the
    newest version, which this one now is. `best` moves only when `metrics[best_metric]` beats the value tagged on the current `best` version
    (higher for mode="max", lower for "min"), so re-registering a worse checkpoint never demotes it.
    """
    export_dir = Path(export_dir)
    check_export_dir(export_dir)
    if mode not in ("max", "min"):
        raise ValueError(f"register mode must be 'max' or 'min', got {mode!r}")
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if best_metric is not None and best_metric not in metrics:
        # e.g. a run without validation data: still publish the version, just do not rank it
        log.warning("registering %s without moving '%s': metric %r not among %s", name, BEST_ALIAS,
                    best_metric, sorted(metrics))
        best_metric = None
    leaf = f"step_{step:08d}" if step is not None else export_dir.name
    artifact_path = f"{EXPORT_ARTIFACT_DIR}/{leaf}"
    client.log_artifacts(run_id, str(export_dir), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="ViT checkpoints exported by vitscale")
        except MlflowException as race:  # another job created it between our two calls
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    version_tags = {"source_run_id": run_id, **{f"metric.{k}": repr(v) for k, v in metrics.items()}}
    if step is not None:
        version_tags["step"] = str(step)
    version_tags |= {k: str(v) for k, v in (tags or {}).items()}
    mv = client.create_model_version(name, source, run_id=run_id, tags=version_tags, description=description)
    applied = [LATEST]
    for alias in (a for a in aliases if a.lower() != LATEST):
        client.set_registered_model_alias(name, alias, mv.version)
        applied.append(alias)
    if best_metric is not None and _is_better(metrics[best_metric],
                                              _version_metric(client, name, BEST_ALIAS, best_metric), mode):
        client.set_registered_model_alias(name, BEST_ALIAS, mv.version)
        applied.append(BEST_ALIAS)
    return RegisteredVersion(name, str(mv.version), run_id, source, tuple(applied))


# ---------------------------------------------------------------------------------------------- resolve
def _newest_export_local(root: Path) -> Path | None:
    exports = sorted(p.parent for p in (root / EXPORT_ARTIFACT_DIR).glob(f"*/{WEIGHTS_FILE}"))
    return exports[-1] if exports else None


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            uri = client.tracking_uri
            raise TrackingNotFound(f"unknown MLflow run {run_id!r} in the store {describe_store(uri)} "
                                   f"({uri_origin(uri)})") from None
        raise


def require_run(run_id: str, tracking_uri: str | None = None):
    """The run (for a CLI's --run-id, checked before any work) or TrackingNotFound naming the store;
    a missing sqlite store is reported, not created."""
    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri, f"looking up run {run_id}")
    return _get_run(MlflowClient(uri), run_id)


def resolve_weights(
    uri: str | Path,
    *,
    dst: Path | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> ResolvedWeights:
    """Local directory with model.safetensors + model_config.json for any accepted weights URI.

    Accepts models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/artifact/path] (no path: the
    run's newest export), a local export directory or its model.safetensors, or a training
    output_dir (its newest export/<tag>). Downloads are cached under $VITSCALE_CACHE (default
    ~/.cache/vitscale) or `dst`. A server that does not answer within `timeout_s` (no MLflow-level
    retries) falls back to this machine's last resolution of the same URI, with a warning, or raises
    TrackingUnreachable: one line naming the server.
    """
    parsed = parse_uri(uri)
    text = str(uri)
    if isinstance(parsed, LocalURI):
        path = parsed.path.parent if parsed.path.is_file() else parsed.path
        if path.is_dir() and not (path / WEIGHTS_FILE).exists():
            path = _newest_export_local(path) or path
        if not path.exists():
            raise FileNotFoundError(f"weights path {parsed.path} does not exist (expected {URI_FORMS})")
        check_export_dir(path)
        return ResolvedWeights(path, text)

    tracking_uri = resolve_tracking_uri(tracking_uri)
    # Without an explicit registry URI MLflow falls back to the *global* one, not this tracking URI.
    registry_uri = registry_uri or tracking_uri
    # MLflow would create an empty sqlite store and then report the model missing from it.
    require_store(registry_uri if isinstance(parsed, ModelURI) else tracking_uri, f"resolving {text}")
    server = server_of(registry_uri if isinstance(parsed, ModelURI) else tracking_uri)
    try:
        with fast_fail_http(timeout_s):
            resolved = _resolve_remote(parsed, text, dst, tracking_uri, registry_uri)
    except Exception as exc:  # noqa: BLE001 - only outages are handled here; everything else re-raised
        reason = unreachable_reason(exc)
        if reason is None:
            denied = auth_error(exc, server, f"resolving {text}")
            if denied is not None:
                raise denied from None
            raise
        cached = recall(server, text)
        if cached is None:
            raise TrackingUnreachable(
                f"MLflow server {server} unreachable ({reason}, {timeout_s}s timeout) while resolving {text}, "
                f"and no earlier resolution is cached on this machine ({_cache_root()}); start the server, "
                f"point tracking.uri / MLFLOW_TRACKING_URI at a running one, or pass a local export "
                f"directory") from None
        log.warning("MLflow server %s unreachable (%s): using the copy of %s resolved on %s%s at %s",
                    server, reason, text, cached["resolved_at"],
                    f" (version {cached['version']})" if cached.get("version") else "", cached["path"])
        path = Path(cached["path"])
        check_export_dir(path)
        return ResolvedWeights(path, text, cached.get("model_name"), cached.get("version"), cached.get("run_id"),
                               cached_at=cached["resolved_at"])
    remember(server, text, resolved.path, model_name=resolved.model_name, version=resolved.version,
             run_id=resolved.run_id)
    return resolved


def _resolve_remote(parsed: ModelURI | RunURI, text: str, dst: Path | None, tracking_uri: str,
                    registry_uri: str) -> ResolvedWeights:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    if isinstance(parsed, ModelURI):
        mv = _model_version(client, parsed, registry_uri)
        sub = f"/{parsed.subpath}" if parsed.subpath else ""
        # run ids are globally unique, so two stores with a "v1" of the same name never share a cache entry
        leaf = f"v{mv.version}-{(mv.run_id or 'norun')[:12]}{_safe(sub)}"
        final = Path(dst) if dst else _cache_root() / "models" / _safe(parsed.name) / leaf
        # Download from the version's artifact location rather than a models:/ URI: MLflow resolves
        # models:/ against the process-global registry, ignoring the registry_uri passed in.
        source = client.get_model_version_download_uri(parsed.name, str(mv.version)).rstrip("/") + sub
        path = _download_once(lambda tmp: download_artifacts(
            artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri, registry_uri=registry_uri), final)
        check_export_dir(path)
        return ResolvedWeights(path, text, parsed.name, str(mv.version), mv.run_id)

    _get_run(client, parsed.run_id)
    artifact_path = parsed.path or _newest_export_artifact(client, parsed.run_id)
    final = Path(dst) if dst else _cache_root() / "runs" / parsed.run_id / _safe(artifact_path)
    path = _download_once(lambda tmp: download_artifacts(
        run_id=parsed.run_id, artifact_path=artifact_path, dst_path=str(tmp),
        tracking_uri=client.tracking_uri), final)
    check_export_dir(path)
    return ResolvedWeights(path, text, run_id=parsed.run_id)


def _model_version(client: MlflowClient, parsed: ModelURI, registry_uri: str):
    """The ModelVersion a models:/ URI names, or TrackingNotFound saying what exists instead."""
    try:
        if parsed.alias:
            return client.get_model_version_by_alias(parsed.name, parsed.alias)
        version = newest_version(client, parsed.name) if parsed.latest else parsed.version
        if version is not None:
            return client.get_model_version(parsed.name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    raise TrackingNotFound(_missing_model_message(client, parsed, registry_uri)) from None


def _missing_model_message(client: MlflowClient, parsed: ModelURI, registry_uri: str) -> str:
    what = f"alias {parsed.alias!r}" if parsed.alias else (
        "versions (so @latest names nothing)" if parsed.latest else f"version {parsed.version}")
    where = f"in the registry {describe_store(registry_uri)} ({uri_origin(registry_uri)})"
    try:
        model = client.get_registered_model(parsed.name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=20))
        there = f"registered models there: {', '.join(names[:8])}" if names else "it holds no registered models"
        return f"registered model {parsed.name!r} has no {what}: no model of that name {where}; {there}"
    newest = newest_version(client, parsed.name)
    aliases = sorted(getattr(model, "aliases", {}) or {})
    known = (f"newest version {newest}" if newest else "no versions") + (
        f", aliases {', '.join('@' + a for a in aliases)}" if aliases else ", no aliases")
    return f"registered model {parsed.name!r} has no {what} {where} (it has {known})"


def _newest_export_artifact(client: MlflowClient, run_id: str) -> str:
    exports = sorted(f.path for f in client.list_artifacts(run_id, EXPORT_ARTIFACT_DIR) if f.is_dir)
    if not exports:
        raise TrackingNotFound(f"run {run_id} has no {EXPORT_ARTIFACT_DIR}/ artifacts in the store "
                               f"{describe_store(client.tracking_uri)}: name one with runs:/{run_id}/<path> or "
                               f"register an export first")
    return exports[-1]
