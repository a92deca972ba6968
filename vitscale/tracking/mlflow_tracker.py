"""The training job's MLflow run: config, metrics, artifacts, figures and registered checkpoints.

Nothing here may stop training: work that needs the server is queued
(run creation, params, tags, artifacts, registrations) or buffered (metrics) and sent when the server
answers; see resilience.py for the retry policy. Metrics are sent in batches (MLflow's log_batch
limits) every `flush_interval_s` so a step costs a list append, not a request.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from vitscale.engine.checkpoint.layout import LATEST
from vitscale.plain import plain_dict
from vitscale.tracking.base import NullTracker, Tracker
from vitscale.tracking.provenance import data_fingerprints, flatten_params, git_commit
from vitscale.tracking.replay import UNSENT_METRICS, replay_command, write_unsent_registrations
from vitscale.tracking.lineage import NOTE_TAG, lineage_markdown, lineage_of, source_lineage
from vitscale.tracking.registry import (
    CHECKPOINT_ARTIFACT_DIR, OUTPUT_DIR_TAG, RegisteredVersion, check_export_dir, register_export,
)
from vitscale.tracking.resilience import Outcome, Resilient, RetryPolicy
from vitscale.tracking.settings import RUN_ID_FILE, TrackingSettings, default_run_name
from vitscale.tracking.ui import ui_hint
from vitscale.tracking.uris import is_local_store, resolve_tracking_uri

log = logging.getLogger("vitscale.tracking")
TRIAL_TAG = "vitscale.trial_id"
PARENT_TAG = "mlflow.parentRunId"
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ ]")


def _metric_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_ENTITY_KEY_LENGTH]


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker(Tracker):
    """One MLflow run per training job, written by rank 0 only."""

    def __init__(self, settings: TrackingSettings, local_dir: str | Path = ".",
                 *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.tracking_uri = resolve_tracking_uri(settings.uri)
        self.local_dir = Path(local_dir).resolve() / "tracking"  # staged configs/figures, unsent metrics
        self._clock = clock
        self._res = Resilient(RetryPolicy(settings.retries, settings.backoff_s, settings.retry_interval_s,
                                          settings.strict), clock=clock, sleep=sleep)
        self._client: MlflowClient | None = None
        self._pending: deque[tuple[str, Callable[[str], Any]]] = deque()
        self._metrics: list[Metric] = []
        self._dropped_metrics = 0
        self._skipped_keys: set[str] = set()
        self._last_flush = clock()
        self._existing_params: dict[str, str] = {}
        self._run_tags: dict[str, str] = {}
        self._run_name: str | None = None
        self._started = False
        self.run_id = None
        self.registered: list[RegisteredVersion] = []
        self._unsent_registrations: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ run lifecycle
    def start(self, cfg: Any, ds_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> None:
        container = plain_dict(cfg)
        self._started = True
        self._run_tags = self._provenance_tags(container) | {k: str(v) for k, v in (tags or {}).items()}
        # Always named here: MLflow's generated names come from Python's `random`, which the trainer
        # has seeded by now, so every run would get the same one.
        self._run_name = self.settings.run_name or default_run_name(container, self.settings)
        config_dir = self.local_dir / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "config.yaml").write_text(yaml.safe_dump(container, sort_keys=False))
        if ds_config is not None:
            (config_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2, default=str))
        self.log_params(flatten_params(container))
        for item in sorted(config_dir.iterdir()):
            self.log_artifact(item, "config")
        finetune = container.get("finetune")
        source = finetune.get("source") if isinstance(finetune, Mapping) else None
        # Lineage: the registered version / run this fine-tune starts from. The trainer passes the tags
        # of the weights it loaded; resolving the source here is the fallback for other callers.
        if source and "finetune.source_uri" not in self._run_tags:
            self._enqueue("record fine-tune source", lambda rid: self._record_lineage(
                rid, source_lineage(self._client_or_create(), str(source))))
        elif lineage_of(self._run_tags):
            self._enqueue("describe fine-tune source", lambda rid: self._record_lineage(rid, {}))
        self.flush()

    def _record_lineage(self, run_id: str, resolved: Mapping[str, str]) -> None:
        """Lineage tags, and the run's description linking the source version and run pages."""
        self._run_tags |= resolved
        lineage = lineage_of(self._run_tags)
        note = lineage_markdown(self._client_or_create(), lineage)
        self._send_tags(run_id, {**resolved, **({NOTE_TAG: note} if note else {})})

    def _provenance_tags(self, container: Mapping[str, Any]) -> dict[str, str]:
        tags: dict[str, str] = {}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit[0]
            tags["vitscale.git_dirty"] = str(commit[1]).lower()
        data_cfg = container.get("data")
        tags |= data_fingerprints(data_cfg if isinstance(data_cfg, Mapping) else None)
        if container.get("output_dir"):
            tags[OUTPUT_DIR_TAG] = str(Path(str(container["output_dir"])).resolve())
        if self.settings.parent_run_id:
            tags[PARENT_TAG] = self.settings.parent_run_id
        if self.settings.trial_id:
            tags[TRIAL_TAG] = str(self.settings.trial_id)
        return tags

    def _client_or_create(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri,
                                        registry_uri=self.settings.registry_uri or self.tracking_uri)
        return self._client

    def _experiment_id(self, client: MlflowClient) -> str:
        name = self.settings.experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if is_local_store(self.tracking_uri):
            location = Path(self.settings.artifact_dir).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # a concurrent trial created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(name).experiment_id

    def _open_run(self) -> str:
        client = self._client_or_create()
        run_id = self.settings.run_id
        if run_id is None and self.settings.trial_id:
            run_id = self._find_trial_run(client)
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s to resume does not exist at %s; starting a new run",
                            run_id, self.tracking_uri)
                self._run_tags["vitscale.resume_missing_run"] = run_id
            else:
                client.update_run(run_id, status="RUNNING")
                self._existing_params = dict(run.data.params)
                log.info("MLflow: re-opened run %s (%s); runs list: %s", run_id, run.info.run_name,
                         ui_hint(self.tracking_uri, run.info.experiment_id))
                return run_id
        experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, run_name=self._run_name, tags=self._run_tags)
        log.info("MLflow: run %s (%s) in experiment %r at %s; runs list: %s", run.info.run_id, run.info.run_name,
                 self.settings.experiment, self.tracking_uri, ui_hint(self.tracking_uri, experiment_id))
        return run.info.run_id

    def _find_trial_run(self, client: MlflowClient) -> str | None:
        exp = client.get_experiment_by_name(self.settings.experiment)
        if exp is None:
            return None
        query = f"tags.`{TRIAL_TAG}` = '{self.settings.trial_id}'"
        if self.settings.parent_run_id:
            query += f" and tags.`{PARENT_TAG}` = '{self.settings.parent_run_id}'"
        runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        return runs[0].info.run_id if runs else None

    def _ensure_run(self) -> bool:
        if self.run_id is not None:
            return True
        if not self._started or not self._res.ready():
            return False
        outcome, run_id = self._res.call("open run", self._open_run)
        if outcome is not Outcome.OK:
            return False
        self.run_id = run_id
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / RUN_ID_FILE).write_text(run_id)
        if self._existing_params:  # re-opened: tags may have changed (new commit), params may not
            self._pending.appendleft(("set tags", lambda rid: self._send_tags(rid, self._run_tags)))
        return True

    # ------------------------------------------------------------------------------------- queued work
    def _enqueue(self, what: str, fn: Callable[[str], Any]) -> None:
        self._pending.append((what, fn))

    def _drain(self) -> bool:
        while self._pending:
            if not self._res.ready():
                return False
            what, fn = self._pending[0]
            outcome, _ = self._res.call(what, lambda: fn(self.run_id))
            if outcome is Outcome.DOWN:
                return False
            self._pending.popleft()
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in params.items()}
        self._enqueue("log params", lambda rid: self._send_params(rid, flat))

    def _send_params(self, run_id: str, params: Mapping[str, str]) -> None:
        changed = sorted(k for k, v in params.items() if k in self._existing_params
                         and self._existing_params[k] != v)
        if changed:  # MLflow params are immutable; a resume with other values keeps the originals
            log.warning("MLflow run %s was resumed with %d changed params (kept the originals, "
                        "see config/config.yaml): %s", run_id, len(changed), ", ".join(changed[:8]))
        new = [Param(k, v) for k, v in params.items() if k not in self._existing_params]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self._client_or_create().log_batch(run_id, params=chunk)
            self._existing_params.update({p.key: p.value for p in chunk})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        tags = {str(k): str(v) for k, v in tags.items()}
        self._run_tags |= tags
        self._enqueue("set tags", lambda rid: self._send_tags(rid, tags))

    def _send_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self._client_or_create().log_batch(run_id, tags=chunk)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")

        def send(run_id: str) -> None:
            client = self._client_or_create()
            if path.is_dir():
                client.log_artifacts(run_id, str(path), subdir)
            else:
                client.log_artifact(run_id, str(path), subdir)
        self._enqueue(f"log artifact {path.name}", send)
        self._maybe_flush()

    def log_figure(self, fig: Any, name: str) -> Path:
        out = self.local_dir / "figures" / f"{_metric_key(name).replace('/', '_')}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, bbox_inches="tight")
        self.log_artifact(out, "figures")
        return out

    def log_checkpoint(self, checkpoint_root: str | Path, tag: str) -> None:
        root = Path(checkpoint_root)
        self.log_artifact(root / tag, f"{CHECKPOINT_ARTIFACT_DIR}/{tag}")
        marker = self.local_dir / "checkpoints" / tag / LATEST  # own copy: the root's `latest` moves on
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(tag)
        self.log_artifact(marker, CHECKPOINT_ARTIFACT_DIR)

    def register(self, export_dir: str | Path, name: str, *, step: int | None = None,
                 metrics: Mapping[str, float] | None = None, best_metric: str | None = None,
                 mode: str = "max", aliases: Iterable[str] = (),
                 tags: Mapping[str, str] | None = None) -> RegisteredVersion | None:
        export_dir = Path(export_dir).resolve()
        check_export_dir(export_dir)  # caller bugs raise now, not in a queued call later
        if mode not in ("max", "min"):
            raise ValueError(f"register mode must be 'max' or 'min', got {mode!r}")
        aliases = tuple(aliases)
        metrics = dict(metrics or {})

        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        record = {"export_dir": str(export_dir), "name": name, "step": step, "metrics": metrics,
                  "best_metric": best_metric, "mode": mode, "aliases": list(aliases),
                  "tags": lineage_of(self._run_tags) | tags}
        self._unsent_registrations.append(record)  # until the server confirms it (end() writes it out)

        def send(run_id: str) -> RegisteredVersion:
            client = self._client_or_create()
            lineage = lineage_of(self._run_tags)  # a fine-tune's versions carry their source too
            version = register_export(client, run_id, export_dir, name, step=step, metrics=metrics,
                                      best_metric=best_metric, mode=mode, aliases=aliases, tags=lineage | tags,
                                      description=lineage_markdown(client, lineage))
            self._unsent_registrations.remove(record)
            self.registered.append(version)
            log.info("MLflow: registered %s", version.describe())
            return version
        before = len(self.registered)
        self._enqueue(f"register {name}", send)
        self.flush()
        return self.registered[-1] if len(self.registered) > before else None

    # ---------------------------------------------------------------------------------------- metrics
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                if key not in self._skipped_keys:  # once per key: a caller bug must not stop training
                    self._skipped_keys.add(key)
                    log.warning("MLflow tracking: metric %r is not a number (%r); not logged", key, value)
                continue
            self._metrics.append(Metric(_metric_key(key), number, now_ms, int(step)))
        overflow = len(self._metrics) - self.settings.max_buffered_metrics
        if overflow > 0:
            if self._dropped_metrics == 0:
                log.warning("MLflow tracking: metric buffer full (%d); dropping the oldest while the "
                            "server is unreachable", self.settings.max_buffered_metrics)
            del self._metrics[:overflow]
            self._dropped_metrics += overflow
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        due = self._clock() - self._last_flush >= self.settings.flush_interval_s
        if due or len(self._metrics) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> bool:
        self._last_flush = self._clock()
        if not self._ensure_run() or not self._drain():
            return False
        client = self._client_or_create()
        while self._metrics:
            if not self._res.ready():
                return False
            batch = self._metrics[:MAX_METRICS_PER_BATCH]
            outcome, _ = self._res.call("log metrics", lambda: client.log_batch(self.run_id, metrics=batch))
            if outcome is Outcome.DOWN:
                return False
            if outcome is Outcome.DROPPED:
                self._dropped_metrics += len(batch)
            del self._metrics[:len(batch)]
        return True

    @property
    def failures(self) -> int:
        return self._res.failures

    @property
    def pending(self) -> int:
        """Queued calls plus buffered metrics not yet sent."""
        return len(self._pending) + len(self._metrics)

    def end(self, status: str = "FINISHED") -> None:
        if not self._started:
            return
        self._res.allow_now()  # one last try regardless of the retry interval
        if self.flush() and self.run_id is not None:
            self._res.call("end run", lambda: self._client_or_create().set_terminated(self.run_id, status))
        if self.pending or self._dropped_metrics or self._res.failures or self._unsent_registrations:
            self._spill_unsent(status)
        self._started = False

    def _spill_unsent(self, status: str) -> None:
        """Nothing is lost silently: unsent metrics and registrations go to JSONL files that
        ``python -m vitscale.tracking.replay`` sends later, and one warning says where."""
        path = self.local_dir / UNSENT_METRICS
        if self._metrics:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                for m in self._metrics:
                    fh.write(json.dumps({"key": m.key, "value": m.value, "step": m.step,
                                         "timestamp": m.timestamp}) + "\n")
        saved = [f"metrics to {path}"] if self._metrics else []
        if self._unsent_registrations:
            regs = write_unsent_registrations(self.local_dir, self._unsent_registrations, run_id=self.run_id,
                                              settings=self.settings, tracking_uri=self.tracking_uri)
            saved.append(f"{len(self._unsent_registrations)} model registration(s) to {regs}")
        others = len(self._pending) - len(self._unsent_registrations)
        log.warning("MLflow tracking summary (run %s, %s): %d failed calls, %d metrics dropped, "
                    "%d metrics and %d other calls unsent%s", self.run_id, status, self._res.failures,
                    self._dropped_metrics, len(self._metrics), max(others, 0),
                    f"; saved {' and '.join(saved)}: send them with `{replay_command(self.local_dir)}`"
                    if saved else "")


def make_tracker(cfg: Any, rank: int = 0) -> Tracker:
    """MlflowTracker on rank 0 (unless tracking.enabled=false), NullTracker elsewhere.

    Caps MLflow's own HTTP retries/timeout for this process (unless the user set them) because its
    defaults (7 retries, exponential backoff, 120 s timeout) would stall a step for minutes when the
    server is down; our own retry/buffer layer takes over.
    """
    container = plain_dict(cfg)
    settings = TrackingSettings.from_mapping(container.get("tracking"), resume=container.get("resume"),
                                             output_dir=container.get("output_dir"))
    if rank != 0 or not settings.enabled:
        return NullTracker()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.http_timeout_s))
    return MlflowTracker(settings, local_dir=container.get("output_dir") or ".")
