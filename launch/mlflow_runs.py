"""MLflow bookkeeping of a sweep: the parent run (driver) and closing the trials' child runs.

Child runs are opened by rank 0 of each trial through vitscale.tracking (tag mlflow.parentRunId and
the trial-id tag, by which a restarted trial re-opens its run). When ASHA stops a trial, Tune kills
the trial's processes before the Trainer can end its run, so the driver closes it here; the same
callback records on each child the overrides that reproduce it and whether it was stopped early.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from launch.search_space import as_overrides
from launch.spec import SweepSpec

log = logging.getLogger(__name__)
SWEEP_TAG = "vitscale.sweep"
OVERRIDES_TAG = "vitscale.sweep.overrides"
EARLY_STOP_TAG = "vitscale.sweep.early_stopped"
_TRAINER_ONLY = ("register_name", "register_every")


def parent_config(cfg: DictConfig, spec: SweepSpec, sweep_dir: str) -> dict[str, Any]:
    """The base training config as the parent run records it (params = the shared settings)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container["output_dir"] = sweep_dir  # the tracker stages its files under output_dir/tracking
    tracking = container.setdefault("tracking", {})
    for key in _TRAINER_ONLY:
        tracking.pop(key, None)
    tracking["run_name"] = spec.name
    return container


def open_parent(container: dict[str, Any], spec: SweepSpec) -> Any:
    """Start the parent run (rank-0 style Tracker); returns it with run_id set, or a NullTracker."""
    from vitscale.tracking import make_tracker

    tracker = make_tracker(container, rank=0)
    space = {k: {d.kind: list(d.values)} for k, d in spec.search_space.items()}
    tags = {SWEEP_TAG: spec.name, "vitscale.sweep.metric": f"{spec.metric} ({spec.mode})",
            "vitscale.sweep.search_space": json.dumps(space, default=str), **spec.extra_tags}
    tracker.start(container, None, tags=tags)  # params: the base config, sweep.* included
    tracker.flush()
    if getattr(tracker, "tracking_uri", None) is not None and tracker.run_id is None:
        log.warning("MLflow parent run could not be opened (tracking server down?); trials will run "
                    "without a parent and results are kept on disk")
    return tracker


def make_child_closer(tracking_uri: str, experiment: str, parent_run_id: str, max_steps: int) -> Any:
    """A Tune callback bound to this sweep's parent run (Ray imported lazily: validation is Ray-free)."""
    from mlflow.tracking import MlflowClient
    from ray.tune import Callback

    from vitscale.tracking.mlflow_tracker import PARENT_TAG, TRIAL_TAG

    class ChildRunCloser(Callback):
        """Tags each child with its overrides once, and ends it when Tune is done with the trial."""

        def __init__(self) -> None:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.tagged: set[str] = set()

        def _child(self, trial_id: str) -> Any | None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                return None
            runs = self.client.search_runs(
                [exp.experiment_id],
                f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
                order_by=["attributes.start_time DESC"], max_results=1)
            return runs[0] if runs else None

        def _safely(self, what: str, fn: Any) -> None:
            try:
                fn()
            except Exception as err:  # tracking must never stop a sweep; say what was not recorded
                log.warning("MLflow: could not %s: %s", what, err)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: Mapping[str, Any], **info: Any) -> None:
            if trial.trial_id in self.tagged:
                return

            def tag() -> None:
                child = self._child(trial.trial_id)
                if child is not None:
                    self.client.set_tag(child.info.run_id, OVERRIDES_TAG, as_overrides(trial.config))
                    self.tagged.add(trial.trial_id)
            self._safely(f"tag the child run of trial {trial.trial_id}", tag)

        def _close(self, trial: Any, status: str) -> None:
            def close() -> None:
                child = self._child(trial.trial_id)
                if child is None:
                    log.warning("MLflow: no child run found for trial %s", trial.trial_id)
                    return
                run_id = child.info.run_id
                step = int((trial.last_result or {}).get("step", 0))
                early = status == "FINISHED" and step < max_steps
                self.client.set_tag(run_id, OVERRIDES_TAG, as_overrides(trial.config))
                self.client.set_tag(run_id, EARLY_STOP_TAG, str(early).lower())
                if child.info.status == "RUNNING" or status == "FAILED":
                    self.client.set_terminated(run_id, status if not early else "KILLED")
            self._safely(f"close the child run of trial {trial.trial_id}", close)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._close(trial, "FAILED")

    return ChildRunCloser()
