"""The sweep driver: validate, start or attach Ray, run the Tuner, then results and registration.

Order matters for the user's time: everything that can be checked without Ray (config keys, types,
reporting cadence, and on the embedded path the resources) fails before Ray starts; resources of
an attached cluster are checked right after connecting, before any trial is scheduled.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch.cluster import (
    HEAD_NODE, TRIAL_SLOT, check_dashboard_available, check_trial_fits, local_capacity, resolve_address, start_ray,
)
from launch.spec import SweepSpec, check_reporting, parse_sweep, resolved_max_t, validate_against

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    """What a finished sweep produced (returned to callers such as tests and notebooks)."""

    sweep_dir: Path
    results_csv: Path
    results_png: Path
    table: Any  # pandas DataFrame, best trial first
    parent_run_id: str | None
    registered: Any  # vitscale.tracking.RegisteredVersion or None


def validate(cfg: DictConfig, address: str | None) -> SweepSpec:
    """All Ray-free checks; raises SweepConfigError / ClusterResourceError / ValueError (one line)."""
    from vitscale.config import validate as validate_run

    spec = parse_sweep(cfg)
    validate_against(cfg, spec)
    check_reporting(cfg, spec)
    validate_run(cfg)
    check_local_shards(cfg)
    if address is None:  # the embedded Ray would get exactly this machine
        check_trial_fits([local_capacity()], spec.resources, "this machine (embedded Ray)")
        check_dashboard_available()
    return spec


def check_local_shards(cfg: DictConfig) -> None:
    """Local shard paths must exist before trials start; remote URLs (s3://, pipe:) are the loader's."""
    from vitscale.data.config import expand_shards

    for key in ("train_shards", "val_shards"):
        spec = OmegaConf.to_container(cfg.data, resolve=True).get(key)  # type: ignore[union-attr]
        for url in expand_shards(spec, key):
            if "://" in url or url.startswith("pipe:"):
                continue
            if not Path(url).is_file():
                raise FileNotFoundError(
                    f"data.{key}: {url} does not exist (pattern {spec!r}); write the shards with "
                    f"python -m data_tools.shard or pass data.{key}=... (for the demo: make demo)")


def sweep_paths(cfg: DictConfig, spec: SweepSpec) -> tuple[Path, str]:
    """(sweep_dir, run name): storage_path/<name>-<UTC time>, absolute so every process agrees."""
    root = Path(spec.storage_path or Path(str(cfg.get("output_dir") or "outputs")).parent / "sweeps")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_name = f"{spec.name}-{stamp}"
    return root.expanduser().resolve() / run_name, run_name


def run_sweep(cfg: DictConfig, address: str | None = None) -> SweepOutcome:
    """Run the sweep `cfg.sweep` describes over the training config `cfg`."""
    import ray

    from launch.mlflow_runs import open_parent, parent_config
    from launch.ray_trial import TrialPlan, forwarded_env

    address = resolve_address(address)
    spec = validate(cfg, address)
    sweep_dir, run_name = sweep_paths(cfg, spec)
    base = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(base, dict)
    slots, has_slot = start_ray(address, spec.resources, spec.max_concurrent_trials, forwarded_env(base))
    tracker = None
    try:
        tracker = open_parent(parent_config(cfg, spec, str(sweep_dir)), spec)
        plan = TrialPlan(
            base_config=base, sweep_name=spec.name, trials_dir=str(sweep_dir / "trials"),
            storage_path=str(sweep_dir / "ray_train"), num_workers=spec.resources.num_workers,
            cpus_per_worker=spec.resources.cpus_per_worker, gpus_per_worker=spec.resources.gpus_per_worker,
            max_failures=spec.max_failures, parent_run_id=getattr(tracker, "run_id", None),
            launch_cwd=os.getcwd())
        tuner = _make_tuner(cfg, spec, plan, tracker, slots=slots, has_slot=has_slot,
                            sweep_dir=sweep_dir, run_name=run_name)
        outcome = _summarize(tuner.fit(), cfg, spec, plan, tracker, sweep_dir)
        tracker.end("FINISHED")
        log.info("sweep %s done: %s", run_name, outcome.results_csv)
        return outcome
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    finally:
        ray.shutdown()


def _make_tuner(cfg: DictConfig, spec: SweepSpec, plan: Any, tracker: Any, *, slots: int, has_slot: bool,
                sweep_dir: Path, run_name: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from launch.mlflow_runs import make_child_closer
    from launch.ray_trial import run_trial
    from launch.search_space import to_param_space

    if spec.scheduler.type == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr=spec.scheduler.time_attr, max_t=resolved_max_t(cfg, spec),
            grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor,
            stop_last_trials=False)  # a trial that reaches max_t finishes (and exports) by itself
    else:
        scheduler = FIFOScheduler()
    callbacks = []
    if plan.parent_run_id is not None:
        callbacks.append(make_child_closer(tracker.tracking_uri, str(cfg.tracking.experiment),
                                           plan.parent_run_id, int(cfg.trainer.max_steps)))
    # Tune refuses an all-zero request; without trial_slot, a sliver of the head node's marker
    # resource (every cluster has it) places the light trial actors there, holding no CPU.
    trial_resources = {"CPU": 0, TRIAL_SLOT: 1} if has_slot else {"CPU": 0, HEAD_NODE: 0.001}
    seed = spec.seed if spec.seed is not None else int(cfg.get("seed", 0))
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, plan=plan), trial_resources),
        param_space=to_param_space(spec.search_space),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=scheduler,
            # max_concurrent lives on the searcher: TuneConfig's is ignored with a search generator.
            search_alg=BasicVariantGenerator(max_concurrent=slots, random_state=seed)),
        run_config=tune.RunConfig(
            name=run_name, storage_path=str(sweep_dir.parent), callbacks=callbacks,
            # A trial whose actor dies (node loss) is retried once; worker failures inside a
            # trial are Ray Train's FailureConfig (sweep.failure.max_failures).
            failure_config=tune.FailureConfig(max_failures=1)),
    )


def _summarize(grid: Any, cfg: DictConfig, spec: SweepSpec, plan: Any, tracker: Any,
               sweep_dir: Path) -> SweepOutcome:
    """Results table + figure on the parent run; the best trial's model into the registry."""
    from launch.best_model import register_best
    from launch.ray_trial import trial_config
    from launch.results import best_row, results_table, write_results

    table = results_table(grid, spec, int(cfg.trainer.max_steps))
    csv, png = write_results(table, spec, sweep_dir / "results")
    tracker.log_artifact(csv, "sweep")
    tracker.log_artifact(png, "sweep")
    registered = None
    best = best_row(table, spec)
    if best is None:
        log.warning("no trial produced a checkpoint with %s: nothing to register", spec.metric)
    else:
        tracker.log_metrics({f"best/{spec.metric}": float(best[spec.metric])}, int(best["step"]))
        tracker.set_tags({"vitscale.sweep.best_trial": str(best["trial_id"])})
        name = spec.register_name or OmegaConf.select(cfg, "tracking.register_name", default=None)
        if not name:
            log.warning("sweep.register.name and tracking.register_name are unset: best model not registered")
        elif plan.parent_run_id is not None:
            params = {k: _plain(best[k]) for k in spec.search_space}
            trial_cfg = OmegaConf.create(trial_config(plan, params, str(best["trial_id"])))
            registered = register_best(
                tracker, best, trial_cfg, storage_path=plan.storage_path, out_dir=sweep_dir / "best_export",
                name=str(name), alias=spec.register_alias, metric=spec.metric, mode=spec.mode)
    return SweepOutcome(sweep_dir, csv, png, table, plan.parent_run_id, registered)


def _plain(value: Any) -> Any:
    """numpy scalars (from the pandas table) as Python values OmegaConf accepts."""
    return value.item() if hasattr(value, "item") else value
