"""Checkpoints: DeepSpeed's own save/load (all ZeRO stages) plus what exact resume needs beyond it.

Layout (docs/ARCHITECTURE.md): ``output_dir/checkpoints/<tag>/`` as DeepSpeed writes it, and the
``latest`` file. DeepSpeed 0.19 lets rank 0 write ``latest`` without waiting for the other ranks'
shards, so we write it ourselves, atomically, after a barrier: ``latest`` always names a complete
checkpoint even when a rank is killed mid-save. DeepSpeed keeps ``client_state`` from rank
0 only, so per-rank state (RNG streams, the data stream position) goes beside it in
``<tag>/rank_<r>.pt``, written before DeepSpeed's barrier and loaded with ``weights_only=True``.

Export: ZeRO partitions (stages 1-3) are merged by DeepSpeed's ``zero_to_fp32`` into one fp32
state dict, saved as safetensors with ``model_config.json`` so ``create_model(**config)`` +
``load_state_dict`` (or timm through ``vitscale.models.convert.to_timm``) can load it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitscale.engine.schedule import sync_lr_after_load

log = logging.getLogger(__name__)
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint: the directory holding tags (``root``) and the tag to load."""

    root: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- locate
def latest(root: Path) -> CheckpointRef | None:
    """The checkpoint DeepSpeed's ``latest`` file names, if it and its directory exist."""
    marker = root / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (root / tag).is_dir():
        log.warning("%s names %s, which is missing; starting fresh", marker, tag)
        return None
    return CheckpointRef(root, tag)


def resolve(resume: str | None, output_dir: Path, *, tracking_uri: str | None = None) -> CheckpointRef | None:
    """``resume`` -> what to load: ``auto`` (latest in output_dir, or nothing), a path, ``runs:/ID``
    (looked up in ``tracking_uri``, default $MLFLOW_TRACKING_URI).

    A path may be a checkpoint root (holding ``latest``) or one tag directory.
    """
    if resume in (None, "", "none", "null", False):
        return None
    if resume == "auto":
        return latest(output_dir / "checkpoints")
    if str(resume).startswith("runs:/"):
        from vitscale.tracking import resolve_resume

        remote = resolve_resume(str(resume), tracking_uri=tracking_uri)
        return CheckpointRef(Path(remote.path), remote.tag)
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: {path} does not exist")
    found = latest(path)
    if found is not None:
        return found
    if any(path.glob("*model_states.pt")):
        return CheckpointRef(path.parent, path.name)
    raise FileNotFoundError(
        f"resume={resume!r}: {path} is neither a checkpoint root (with a 'latest' file) nor a "
        f"DeepSpeed tag directory (with *model_states.pt)")


# ---------------------------------------------------------------------------- save / load
def save(engine: Any, root: Path, step: int, *, rank: int, client_state: dict[str, Any],
         rank_state: dict[str, Any], keep: int) -> CheckpointRef:
    """Collective: every rank must call it. Returns the checkpoint written."""
    ref = CheckpointRef(root, tag_for(step))
    ref.path.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, ref.path / f"rank_{rank}.pt")
    engine.save_checkpoint(str(root), tag=ref.tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards and rank file are on disk
    if rank == 0:
        tmp = root / "latest.tmp"
        tmp.write_text(ref.tag)
        os.replace(tmp, root / "latest")
        if keep > 0:
            prune(root, keep)
    dist.barrier()
    return ref


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` tags (never the one ``latest`` names)."""
    current = latest(root)
    tags = sorted(p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir())
    for old in tags[:-keep]:
        if current is None or old.name != current.tag:
            shutil.rmtree(old, ignore_errors=True)


def load(engine: Any, ref: CheckpointRef, *, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores engine (weights, optimizer, LR schedule); returns (client, rank) state."""
    path, client_state = engine.load_checkpoint(str(ref.root), tag=ref.tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ref.path}")
    sync_lr_after_load(engine)
    rank_file = ref.path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} missing: the checkpoint was written by a different world size or not by vitscale")
    return dict(client_state or {}), torch.load(rank_file, weights_only=True)


# ---------------------------------------------------------------------------- export
def consolidated_state_dict(ref: CheckpointRef, *, zero_stage: int, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One fp32 state dict: DeepSpeed's zero_to_fp32 for ZeRO 1-3; stage 0 holds full weights already."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)


def export(state_dict: dict[str, torch.Tensor], out_dir: Path, *, model_config: dict[str, Any],
           train_config_yaml: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` (+ ``train_config.yaml``) into out_dir."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (zero_to_fp32 may hand out views): own each one.
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "model_config.json").write_text(json.dumps(_jsonable(model_config), indent=2, sort_keys=True))
    if train_config_yaml is not None:
        (out_dir / "train_config.yaml").write_text(train_config_yaml)
    return out_dir


def load_export(export_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, model config) of an export directory, with one clear error when incomplete."""
    from safetensors.torch import load_file

    weights, config = export_dir / "model.safetensors", export_dir / "model_config.json"
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: expected an export with model.safetensors + model_config.json")
    return load_file(str(weights)), json.loads(config.read_text())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
