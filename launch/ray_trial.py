"""One sweep trial: a Tune function trainable that runs the vitscale Trainer as a Ray Train job.

    Tune trial actor (run_trial)  --TorchTrainer(N workers)-->  train_worker on every rank
        builds the trial's config            Trainer(cfg, callbacks=[RayReporter]).fit()
        from the base + sampled params       metrics + checkpoints -> ray.train.report -> Tune

Why a function trainable and not a TorchTrainer handed to the Tuner: the latter is deprecated in
Ray 2.4x+ (Train V2). The Train run is named after the Tune trial id, so when Tune retries a trial
its TorchTrainer finds the run's own checkpoints again, and Ray Train's FailureConfig restarts a
worker group that lost a rank from the last reported checkpoint (`ray.train.get_checkpoint()`).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from launch.search_space import apply_params
from vitscale.engine.checkpoint.layout import LATEST, latest_tag, step_of

log = logging.getLogger(__name__)
FAULT_ENV = "VITSCALE_SWEEP_FAULT"
_ENV_REF = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
# Environment the trial processes need even on a remote cluster (Ray forwards only runtime_env).
_FORWARD_PREFIXES = ("MLFLOW_", "DS_", "VITSCALE_", "NCCL_", "GLOO_", "HF_", "AWS_", "GOOGLE_")


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs, picklable and independent of the driver process."""

    base_config: dict[str, Any]  # unresolved container: swept keys still feed their interpolations
    sweep_name: str
    trials_dir: str  # absolute; trial t trains in trials_dir/t
    storage_path: str  # Ray Train/Tune storage (shared across nodes on a cluster)
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    parent_run_id: str | None
    launch_cwd: str


def forwarded_env(base_config: Mapping[str, Any]) -> dict[str, str]:
    """Driver variables the trials must see: tracking/DeepSpeed/comm settings and every variable the
    config reads through ${oc.env:NAME}, so a trial resolves the config as the driver would."""
    names = set(_ENV_REF.findall(str(base_config)))
    out = {k: v for k, v in os.environ.items() if k in names or k.startswith(_FORWARD_PREFIXES)}
    return {k: v for k, v in out.items() if not k.startswith("RAY_")}


def trial_config(plan: TrialPlan, params: Mapping[str, Any], trial_id: str) -> dict[str, Any]:
    """The resolved training config of one trial (also what its MLflow child run records)."""
    cfg = apply_params(OmegaConf.create(plan.base_config), params)
    cfg.pop("sweep", None)
    cfg.output_dir = str(Path(plan.trials_dir) / trial_id)
    cfg.resume = None  # set per attempt from Ray's checkpoint
    tracking = cfg.tracking
    tracking.parent_run_id = plan.parent_run_id
    tracking.trial_id = trial_id
    tracking.run_name = f"{plan.sweep_name}-{trial_id}"
    tracking.register_name = None  # only the sweep's best trial is registered, by the driver
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return resolved


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable. Code after fit() may never run: Tune kills the actor on a stop."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, params, trial_id)
    resources = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "launch_cwd": plan.launch_cwd},
        # Ray Train creates the process group: the same collective timeout as a launcher-started run.
        torch_config=TorchConfig(timeout_s=int(cfg["trainer"].get("dist_timeout_s", 1800))),
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=bool(plan.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"train-trial_id={trial_id}", storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def checkpoint_step(checkpoint_root: Path) -> int | None:
    """Step of the checkpoint a `latest` file names (the layout is vitscale.engine.checkpoint's)."""
    tag = latest_tag(checkpoint_root)
    return step_of(tag) if tag else None


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train rank: the process group exists already (DeepSpeed joins it)."""
    import ray.train

    from vitscale.console import setup_console
    from vitscale.start import build_trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Ray starts workers in its session directory; relative paths in the config (shards, the sqlite
    # tracking store) mean the directory the sweep was launched from, when this node has it.
    if Path(loop_config["launch_cwd"]).is_dir():
        os.chdir(loop_config["launch_cwd"])
    cfg = OmegaConf.create(loop_config["cfg"])
    context = ray.train.get_context()
    setup_console(context.get_world_rank(), deepspeed=True)  # vitscale/console.py: ranks > 0 WARNING+, noise hidden
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as restored:
        resumed_from = checkpoint_step(Path(restored)) if restored else None
        cfg.resume = restored
        reporter = RayReporter(cfg, rank=context.get_world_rank(), local_rank=context.get_local_rank(),
                               resumed_from=resumed_from)
        callbacks: list[Any] = [reporter]
        fault = FaultInjector.from_env(context.get_world_rank())
        if fault is not None:
            callbacks.append(fault)
        build_trainer(cfg, rank=context.get_world_rank(), callbacks=callbacks).fit()
        reporter.flush()


class RayReporter:
    """Trainer callback: one `ray.train.report` per evaluation, carrying the checkpoint saved at the
    same step when there is one, so ASHA sees fresh metrics and a restart loses at most one interval.

    The loop evaluates before it checkpoints on a shared step, except at the last step, where the
    checkpoint may come first and the final evaluation after it: whichever arrives first waits for
    its partner. Every rank reports (Ray's report is a barrier). Only local rank 0 of each node
    attaches files: on one node the ranks share output_dir, so one copy is complete; across nodes
    Ray merges each node's shards into one checkpoint directory.
    """

    def __init__(self, cfg: DictConfig, *, rank: int, local_rank: int, resumed_from: int | None) -> None:
        self.rank, self.local_rank = rank, local_rank
        self.max_steps = int(cfg.trainer.max_steps)
        self.ckpt_every = int(cfg.trainer.checkpoint_every)
        self.staging = Path(cfg.output_dir) / "ray_staging" / f"rank_{rank}"
        self.extra = {"resumed_from_step": -1 if resumed_from is None else resumed_from}
        self.last_eval: dict[str, Any] = {}
        self.pending_eval: tuple[int, dict[str, Any]] | None = None
        self.pending_ckpt: tuple[int, Path, dict[str, Any]] | None = None

    def _checkpoint_follows(self, step: int) -> bool:
        return step >= self.max_steps or (self.ckpt_every > 0 and step % self.ckpt_every == 0)

    def on_log(self, record: Mapping[str, Any], step: int) -> None:
        waiting = self.pending_eval or self.pending_ckpt
        if waiting is not None and step > waiting[0]:
            self.flush()

    def on_eval(self, metrics: Mapping[str, Any], step: int) -> None:
        self.last_eval = dict(metrics)
        if self.pending_ckpt is not None and self.pending_ckpt[0] == step:
            _, ckpt_dir, train_metrics = self.pending_ckpt
            self.pending_ckpt = None
            self._report(step, {**train_metrics, **metrics}, ckpt_dir)
            return
        self.flush()
        if self._checkpoint_follows(step):
            self.pending_eval = (step, dict(metrics))
        else:
            self._report(step, metrics, None)

    def on_checkpoint(self, step: int, ckpt_dir: str, metrics: Mapping[str, Any]) -> None:
        if self.pending_eval is not None and self.pending_eval[0] == step:
            merged = {**metrics, **self.pending_eval[1]}
            self.pending_eval = None
            self._report(step, merged, Path(ckpt_dir))
            return
        self.flush()
        if step >= self.max_steps:  # the final evaluation runs after this checkpoint
            self.pending_ckpt = (step, Path(ckpt_dir), dict(metrics))
        else:
            self._report(step, {**metrics, **self.last_eval}, Path(ckpt_dir))

    def flush(self) -> None:
        """Report whatever still waits for a partner that will not come (called after fit, too)."""
        if self.pending_eval is not None:
            step, metrics = self.pending_eval
            self.pending_eval = None
            self._report(step, metrics, None)
        if self.pending_ckpt is not None:
            step, ckpt_dir, metrics = self.pending_ckpt
            self.pending_ckpt = None
            self._report(step, {**metrics, **self.last_eval}, ckpt_dir)

    def _report(self, step: int, metrics: Mapping[str, Any], ckpt_dir: Path | None) -> None:
        import ray.train

        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        numeric |= self.extra | {"step": step}
        if ckpt_dir is None or self.local_rank != 0:
            ray.train.report(numeric, checkpoint=None)
            return
        staged = self._stage(ckpt_dir)
        try:
            ray.train.report(numeric, checkpoint=ray.train.Checkpoint.from_directory(str(staged)))
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _stage(self, ckpt_dir: Path) -> Path:
        """A checkpoint root holding only this tag and a `latest` naming it, built from hard links
        (no copy of the shards) so Ray uploads one tag, not every kept one."""
        shutil.rmtree(self.staging, ignore_errors=True)
        target = self.staging / ckpt_dir.name
        shutil.copytree(ckpt_dir, target, copy_function=_link_or_copy)
        (self.staging / LATEST).write_text(ckpt_dir.name)
        return self.staging


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class FaultInjector:
    """Fault-tolerance drill: `VITSCALE_SWEEP_FAULT=rank=1,step=30,marker=/tmp/killed` makes that
    rank die with os._exit at that step, once (the marker file records it has happened).

    It waits a few seconds first: Ray Train collects a report from the workers asynchronously, and a
    worker that dies within ~2 s of report() can take its last checkpoint with it, which would make
    the drill test Ray's timing rather than our restart.
    """

    def __init__(self, rank: int, step: int, marker: Path, delay_s: float = 3.0) -> None:
        self.rank, self.step, self.marker, self.delay_s = rank, step, marker, delay_s

    @classmethod
    def from_env(cls, rank: int) -> FaultInjector | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        try:
            fields_ = dict(item.split("=", 1) for item in spec.split(","))
            injector = cls(int(fields_["rank"]), int(fields_["step"]), Path(fields_["marker"]),
                           float(fields_.get("delay_s", 3.0)))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected rank=R,step=S,marker=PATH[,delay_s=F] ({err})") from err
        return injector if injector.rank == rank else None

    def on_log(self, record: Mapping[str, Any], step: int) -> None:
        if step >= self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"rank {self.rank} killed at step {step}\n")
            log.warning("%s: rank %d exits at step %d (fault-tolerance drill)", FAULT_ENV, self.rank, step)
            time.sleep(self.delay_s)
            os._exit(1)
