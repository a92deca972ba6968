"""The tracking interface the training loop sees, and its no-op implementation.

The engine calls these methods on every rank without `if rank == 0`: rank 0 holds an MlflowTracker,
the others (and `tracking.enabled=false`) a NullTracker.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # registry imports MLflow; the engine imports this module and must not
    from vitscale.tracking.registry import RegisteredVersion


class Tracker(abc.ABC):
    """What the training loop may ask of experiment tracking (rank 0 real, other ranks no-op)."""

    run_id: str | None = None

    @abc.abstractmethod
    def start(self, cfg: Any, ds_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> None:
        """Open (or re-open, on resume) the run and record config, DeepSpeed config and provenance."""

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffered; sent in batches. NaN/inf are kept; non-numeric values are skipped with a warning."""

    @abc.abstractmethod
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """A file or a whole directory; the path must still exist when the server next answers."""

    @abc.abstractmethod
    def log_figure(self, fig: Any, name: str) -> Path | None:
        """Save a matplotlib figure as PNG (kept locally too) and log it under figures/."""

    @abc.abstractmethod
    def log_checkpoint(self, checkpoint_root: str | Path, tag: str) -> None:
        """Upload DeepSpeed checkpoint `<root>/<tag>` so resume works without the training disk."""

    @abc.abstractmethod
    def register(self, export_dir: str | Path, name: str, *, step: int | None = None,
                 metrics: Mapping[str, float] | None = None, best_metric: str | None = None,
                 mode: str = "max", aliases: Iterable[str] = (),
                 tags: Mapping[str, str] | None = None) -> RegisteredVersion | None:
        """Register a consolidated export; None if it was queued (server down) or on a non-zero rank."""

    @abc.abstractmethod
    def flush(self) -> bool:
        """Send everything pending now; True when nothing is left."""

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


class NullTracker(Tracker):
    """Ranks other than 0, and `tracking.enabled=false`: accepts every call and does nothing."""

    def start(self, cfg, ds_config=None, tags=None) -> None:
        pass

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        pass

    def log_artifact(self, path, subdir=None) -> None:
        pass

    def log_figure(self, fig, name) -> None:
        return None

    def log_checkpoint(self, checkpoint_root, tag) -> None:
        pass

    def register(self, export_dir, name, **kwargs) -> None:
        return None

    def flush(self) -> bool:
        return True

    def end(self, status="FINISHED") -> None:
        pass
