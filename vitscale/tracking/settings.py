"""`tracking.*` config keys, validated once so a typo fails at start-up, not hours later."""
from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vitscale.engine.checkpoint.layout import has_checkpoint
from vitscale.tracking.uris import DEFAULT_ARTIFACT_DIR, RunURI, parse_uri

RUN_ID_FILE = "run_id"  # output_dir/tracking/run_id: lets `resume=auto` continue the same run


@dataclass
class TrackingSettings:
    """`cfg.tracking` keys (all optional); see docs/tracking.md."""

    enabled: bool = True
    uri: str | None = None
    registry_uri: str | None = None
    experiment: str = "vitscale"
    run_name: str | None = None
    run_id: str | None = None  # re-open this run (resume); `resume=runs:/ID` sets it too
    parent_run_id: str | None = None  # sweeps: the driver's run
    trial_id: str | None = None  # sweeps: a restarted trial re-attaches to the run carrying this tag
    artifact_dir: str = DEFAULT_ARTIFACT_DIR  # local stores only; a server decides for itself
    strict: bool = False
    retries: int = 3
    backoff_s: float = 0.25
    retry_interval_s: float = 30.0
    flush_interval_s: float = 10.0
    max_buffered_metrics: int = 1_000_000
    http_timeout_s: int = 10
    # Read by the engine, which decides when to export: the model name and how often to register.
    register_name: str | None = None
    register_every: int = 0
    log_checkpoints: bool = False  # upload each DeepSpeed checkpoint: resume=runs:/ID without the training disk
    best_metric: str = "eval/top1"  # moves the `best` alias; best_mode says which direction is better
    best_mode: str = "max"
    figures: bool = True  # the engine logs training curves + Figure 7 panels with the final export

    @classmethod
    def from_mapping(cls, tracking: Mapping[str, Any] | None, resume: str | None = None,
                     output_dir: str | None = None) -> TrackingSettings:
        """`resume=runs:/ID` re-opens that run; `resume=auto` re-opens the run recorded in output_dir
        when output_dir also holds a checkpoint to resume from (the engine's auto-resume rule)."""
        tracking = dict(tracking or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(tracking) - known)
        if unknown:
            raise ValueError(f"unknown tracking.* keys {unknown}; expected some of {sorted(known)}")
        settings = cls(**{k: v for k, v in tracking.items() if v is not None})
        if resume and not settings.run_id:
            if str(resume) == "auto":
                if output_dir and has_checkpoint(Path(output_dir) / "checkpoints"):
                    recorded = Path(output_dir) / "tracking" / RUN_ID_FILE
                    settings.run_id = recorded.read_text().strip() if recorded.is_file() else None
            elif isinstance(parsed := parse_uri(resume), RunURI):
                settings.run_id = parsed.run_id
        return settings


def default_run_name(container: Mapping[str, Any], settings: TrackingSettings) -> str:
    """``<config name or experiment>[-trial-<id>]-<YYYYmmdd-HHMMSS>-<4 hex>``: readable in the runs list
    and distinct even for runs started in the same second. The suffix comes from `secrets`, not
    `random`, which the trainer seeds identically for every run."""
    base = str(container.get("name") or settings.experiment)
    if settings.trial_id:
        base += f"-trial-{settings.trial_id}"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
