"""The best trial's model: its last Ray checkpoint consolidated by the engine, registered in MLflow.

Consolidation reads Ray's checkpoint storage rather than the trial's output_dir because on a cluster
the trial ran on other nodes: storage_path is the one place every node wrote to. The merge itself is
the engine's (DeepSpeed's zero_to_fp32 for ZeRO 1-3), the registration the tracker's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def open_checkpoint(path: str, storage_path: str) -> Any:
    """A ray.train.Checkpoint for a reported checkpoint path on the sweep's storage filesystem."""
    from ray.train import Checkpoint

    if "://" in storage_path:  # cloud storage: reported paths carry no scheme
        import pyarrow.fs

        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        return Checkpoint(path=path, filesystem=filesystem)
    return Checkpoint(path=path)


def _module_weights(tag_dir: Path) -> dict[str, Any]:
    """ZeRO-0 checkpoints hold the full weights in DeepSpeed's model-states file.

    Read weights-only (DeepSpeed's few checkpoint classes allow-listed): the file comes from Ray's
    checkpoint storage, which other machines write to, so it is not trusted to run code."""
    from vitscale.engine.checkpoint import safe_load

    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed *mp_rank_00_model_states.pt to export")
    return safe_load(files[0], map_location="cpu")["module"]


def export_checkpoint(checkpoint_root: Path, trial_cfg: DictConfig, out_dir: Path) -> Path:
    """Consolidate a trial's DeepSpeed checkpoint to `out_dir` (model.safetensors + model_config.json
    + train_config.yaml), the layout vitscale.tracking registers and resolve_weights loads."""
    import torch

    from vitscale.engine import checkpoint as ckpt
    from vitscale.start import model_for

    ref = ckpt.resolve(str(checkpoint_root), out_dir)  # verified against its checksum manifest
    if ref is None:  # resolve() returns None only for resume=None/auto
        raise FileNotFoundError(f"{checkpoint_root}: not a checkpoint")
    stage = int(OmegaConf.select(trial_cfg, "deepspeed.zero_optimization.stage", default=0) or 0)
    with torch.device("cpu"):
        model, _ = model_for(trial_cfg)
    if stage == 0:
        model.load_state_dict(_module_weights(ref.path))
    state = ckpt.consolidated_state_dict(ref, zero_stage=stage, module=model)
    return ckpt.export(state, out_dir, model_config=dict(model.config),
                       train_config_yaml=OmegaConf.to_yaml(trial_cfg, resolve=True))


def register_best(tracker: Any, best: Mapping[str, Any], trial_cfg: DictConfig, *, storage_path: str,
                  out_dir: Path, name: str, alias: str, metric: str, mode: str) -> Any:
    """Export the best trial's last checkpoint and register it (parent run) under `name@alias`."""
    checkpoint = open_checkpoint(str(best["checkpoint_path"]), storage_path)
    with checkpoint.as_directory() as local:
        export_dir = export_checkpoint(Path(local), trial_cfg, out_dir)
    metrics = {metric: float(best[metric])}
    tags = {"vitscale.trial_id": str(best["trial_id"]), "vitscale.sweep.checkpoint": str(best["checkpoint_path"])}
    version = tracker.register(export_dir, name, step=int(best["step"]), metrics=metrics,
                               best_metric=metric, mode=mode, aliases=[alias], tags=tags)
    if version is not None:
        log.info("registered the best trial %s as %s", best["trial_id"], version.uri)
    return version
