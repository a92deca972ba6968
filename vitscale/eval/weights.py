"""A consolidated export (model.safetensors + model_config.json + train_config.yaml) as a model ready to
evaluate, and the preprocessing it was trained with.

Shared by ``python -m vitscale.evaluate``, ``python -m vitscale.figures`` and the Trainer's figures, so a
checkpoint alone is enough everywhere: the architecture comes from model_config.json and the
normalisation, crop and sample keys from train_config.yaml.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vitscale.tracking import ResolvedWeights


def load_model(weights: str | Path, device: torch.device | str = "cpu", *, tracking_uri: str | None = None,
               registry_uri: str | None = None) -> tuple[torch.nn.Module, dict[str, Any], ResolvedWeights]:
    """(model in eval mode, its config, ResolvedWeights) from any URI resolve_weights accepts.

    A missing model, alias, version, run or store raises vitscale.tracking.TrackingNotFound (one line
    naming it and the store); the CLIs print that line.
    """
    from vitscale.engine.checkpoint import load_export  # the export format's one reader
    from vitscale.models import create_model
    from vitscale.tracking import resolve_weights

    resolved = resolve_weights(weights, tracking_uri=tracking_uri, registry_uri=registry_uri)
    state_dict, config = load_export(resolved.path)
    model = create_model(**config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), config, resolved


@dataclass(frozen=True)
class EvalPreprocessing:
    """How the model saw evaluation images in training (train_config.yaml's data.*): evaluating a
    checkpoint alone must use the same normalisation and crop, or its top-1 silently drops."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    image_key: str = "auto"  # which sample members hold the image and the label (data.image_key / label_key)
    label_key: str = "cls"


def training_preprocessing(export_dir: str | Path, in_chans: int) -> EvalPreprocessing:
    """train_config.yaml's data.mean / std / eval_crop_pct / image_key / label_key, else
    0.5 / 0.5 / 0.875 / auto / cls."""
    default = (0.5,) * in_chans
    path = Path(export_dir) / "train_config.yaml"
    if not path.is_file():
        return EvalPreprocessing(default, default)
    import yaml

    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    return EvalPreprocessing(tuple(data.get("mean") or default), tuple(data.get("std") or default),
                             float(data.get("eval_crop_pct") or 0.875), str(data.get("image_key") or "auto"),
                             str(data.get("label_key") or "cls"))



def manifest_num_classes(shards: str) -> int | None:
    """Class count from data_tools' manifest.json beside the shards (the probe's dataset, which need
    not be the one the model's head was trained on)."""
    path = Path(shards.split("::")[0].split("{")[0]).parent / "manifest.json"
    try:
        return int(json.loads(path.read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
