"""Experiment tracking (MLflow): the run, its metrics and artifacts, the model registry, URI resolution."""
from vitscale.tracking.base import NullTracker, Tracker
from vitscale.tracking.mlflow_tracker import MlflowTracker, make_tracker
from vitscale.tracking.registry import (
    RegisteredVersion, ResolvedCheckpoint, ResolvedWeights, register_export, require_run, resolve_weights,
)
from vitscale.tracking.reach import TrackingAuthError, TrackingUnreachable
from vitscale.tracking.replay import replay
from vitscale.tracking.resilience import TrackingError
from vitscale.tracking.resume import resolve_resume
from vitscale.tracking.settings import TrackingSettings
from vitscale.tracking.stores import TrackingNotFound, one_line_errors, require_store
from vitscale.tracking.ui import experiment_url, ui_hint
from vitscale.tracking.uris import parse_uri, resolve_tracking_uri

__all__ = [
    "MlflowTracker", "NullTracker", "RegisteredVersion", "ResolvedCheckpoint", "ResolvedWeights", "Tracker",
    "TrackingAuthError", "TrackingError", "TrackingNotFound", "TrackingSettings", "TrackingUnreachable",
    "experiment_url", "make_tracker", "one_line_errors", "parse_uri", "register_export", "replay",
    "require_run", "require_store", "resolve_resume", "resolve_tracking_uri", "resolve_weights", "ui_hint",
]
