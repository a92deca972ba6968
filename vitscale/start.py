"""From a composed config to a Trainer ready to fit: the one place where URIs meet the engine.

big_vision's order, written once: resume (``auto``, a path, or ``runs:/ID`` resolved to a local
checkpoint), else the fine-tune source (``models:/NAME@alias`` ... resolved to a local export, with the
lineage tags of the version actually loaded), else fresh. MLflow is consulted here, before the engine
exists; the engine receives local paths and the Tracker it is given (docs/ARCHITECTURE.md).

Entry points: vitscale/train.py, launch/ray_trial.py, the benchmarks and the tests' drivers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig
from torch import nn

from vitscale.config import FinetuneConfig, JobConfig, Start, resolve_model, validate
from vitscale.engine.build import build_model
from vitscale.engine.trainer import Trainer
from vitscale.tracking.base import NullTracker, Tracker


def resolve_start(job: JobConfig) -> Start:
    """``resume`` and ``finetune.source`` as local paths (MLflow URIs resolved here, once)."""
    resume = job.resume
    if resume and str(resume).startswith("runs:/"):
        from vitscale.tracking import resolve_resume

        remote = resolve_resume(str(resume), tracking_uri=job.tracking.uri)
        own_disk = remote.extra.get("source") == "output_dir" or not remote.tag
        # The run's own output_dir: its checkpoint root (the engine picks the newest intact tag);
        # downloaded artifacts: the tag its `latest` named.
        resume = str(remote.path if own_disk else Path(remote.path) / remote.tag)
    if not job.finetune.source:
        return Start(resume=resume)
    source, lineage = _resolve_source(job.finetune.source, job.tracking.uri, job.tracking.registry_uri)
    return Start(resume=resume, source=source, lineage=lineage)


def _resolve_source(source: str, tracking_uri: str | None, registry_uri: str | None) -> tuple[Path, dict[str, str]]:
    """finetune.source -> (local export directory, lineage tags).

    The store the config names (tracking.uri), not only $MLFLOW_TRACKING_URI: a job pointed at a
    server by config must find its registry there too. The lineage tags come from this one
    resolution: resolving `models:/NAME@alias` again later could name another version."""
    from vitscale.tracking import resolve_weights

    weights = resolve_weights(str(source), tracking_uri=tracking_uri, registry_uri=registry_uri)
    return Path(weights.path), weights.lineage_tags()


def model_for(cfg: DictConfig | Mapping[str, Any]) -> tuple[nn.Module, dict[str, str]]:
    """The model a run of ``cfg`` starts from, without an engine or a full config: the registry's
    sizes with the config's overrides, or the resolved fine-tune source loaded at the config's
    resolution with a new head. Returns (model, lineage tags). The sweep's best-model export, the
    planner's validation and tests build models this way."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(container, dict)
    finetune = FinetuneConfig(**(container.get("finetune") or {}))
    num_classes = finetune.num_classes if finetune.source else container["data"]["num_classes"]
    model = resolve_model(container, num_classes=int(num_classes))
    if not finetune.source:
        return build_model(model), {}
    tracking = container.get("tracking") or {}
    source, lineage = _resolve_source(finetune.source, tracking.get("uri"), tracking.get("registry_uri"))
    return build_model(model, source=source, finetune=finetune), lineage


def build_trainer(cfg: DictConfig | Mapping[str, Any], *, world_size: int | None = None, rank: int | None = None,
                  callbacks: Iterable[Any] = (), run_params: Mapping[str, Any] | None = None,
                  batches: Iterable[dict[str, Any]] | None = None) -> Trainer:
    """validate -> resolve the start -> the tracker for this rank -> a Trainer, fully built.

    ``rank`` names the tracker's owner (rank 0 logs); default: $RANK, as torchrun / deepspeed export it.
    """
    job = validate(cfg if isinstance(cfg, DictConfig) else dict(cfg), world_size)
    start = resolve_start(job)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if job.tracking.enabled:
        from vitscale.tracking import make_tracker  # MLflow is imported only for a tracked run

        tracker: Tracker = make_tracker(job.record, rank)
    else:
        tracker = NullTracker()
    return Trainer(job, start=start, tracker=tracker, callbacks=callbacks, run_params=run_params, batches=batches)
