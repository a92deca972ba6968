"""Experiment tracking (MLflow): the run, its metrics and artifacts, the model registry, URI resolution.

Names load lazily (PEP 562): importing the package, or its MLflow-free interface
``vitscale.tracking.base``, does not import MLflow (~2 s per process); a run with
``tracking.enabled=false`` never imports it. ``replay`` is the module ``vitscale.tracking.replay``
(``python -m vitscale.tracking.replay DIR``).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "NullTracker": "base", "Tracker": "base",
    "MlflowTracker": "mlflow_tracker", "make_tracker": "mlflow_tracker",
    "RegisteredVersion": "registry", "ResolvedCheckpoint": "registry", "ResolvedWeights": "registry",
    "register_export": "registry", "require_run": "registry", "resolve_weights": "registry",
    "TrackingAuthError": "reach", "TrackingUnreachable": "reach",
    "TrackingError": "resilience",
    "resolve_resume": "resume",
    "TrackingSettings": "settings",
    "TrackingNotFound": "stores", "one_line_errors": "stores", "require_store": "stores",
    "experiment_url": "ui", "ui_hint": "ui",
    "parse_uri": "uris", "resolve_tracking_uri": "uris",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitscale.tracking' has no attribute {name!r}")
    return getattr(import_module(f"vitscale.tracking.{_EXPORTS[name]}"), name)
