"""What the loop trains: the model (fresh or fine-tuned from a local export) and the loss.

Kept apart from the loop so the Ray sweep, the benchmark and the tests build exactly the model the
trainer builds.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.config import FinetuneConfig
from vitscale.models import ModelConfig

log = logging.getLogger(__name__)
LOSSES = ("softmax_xent", "sigmoid_xent")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# What a fine-tune takes from its source: the architecture and numerics its weights were trained
# with (the source's head, classes and pre-logits layer, are rebuilt to load, then replaced). What it
# takes from its own config: resolution, regularisation and the position-embedding resize.
SOURCE_ARCHITECTURE = ("name", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qk_norm", "pool",
                       "stem_layers", "mlp_act", "stem_norm", "representation_size", "num_classes")


def _finetune_kwargs(kwargs: dict[str, Any], source_config: dict[str, Any], *, source: str) -> dict[str, Any]:
    """The fine-tune's create_model arguments: the source's architecture, the config's resolution."""
    if int(source_config.get("in_chans", 3)) != int(kwargs.get("in_chans", 3)):
        raise ValueError(f"finetune.source={source} takes {source_config.get('in_chans', 3)}-channel images but "
                         f"model.in_chans={kwargs.get('in_chans')}: set model.in_chans to match the source")
    ignored = [f"{k}={kwargs[k]!r}" for k in SOURCE_ARCHITECTURE
               if k in kwargs and k in source_config and k not in ("num_classes", "representation_size")
               and _norm(kwargs[k]) != _norm(source_config[k])]
    if ignored:
        log.info("fine-tune: architecture from the source %s (%s, width %s, depth %s); the config's model.%s "
                 "does not apply", source, source_config.get("name"), source_config.get("embed_dim"),
                 source_config.get("depth"), ", model.".join(ignored))
    out = dict(kwargs)
    out.update({k: source_config[k] for k in SOURCE_ARCHITECTURE if k in source_config})
    return out


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_model(model: ModelConfig, *, source: Path | None = None, finetune: FinetuneConfig | None = None) -> nn.Module:
    """The model of ``model`` (fresh), or with ``source`` (a local export directory; the entry point
    resolved any MLflow URI to it) the source's architecture and weights at this config's resolution
    (position embeddings resampled to the new grid by the model) and a new head of
    ``model.num_classes`` classes (zero-initialised unless ``finetune.head_zero_init`` is false)."""
    from vitscale.models import create_model

    kwargs = model.to_dict()
    if source is None:
        return create_model(**kwargs)
    from vitscale.engine.checkpoint import load_export

    finetune = finetune or FinetuneConfig()
    state_dict, source_config = load_export(source)
    num_classes = model.num_classes
    kwargs = _finetune_kwargs(kwargs, source_config, source=str(finetune.source or source))
    kwargs["posemb_resize"] = finetune.posemb_resize
    net = create_model(**kwargs)
    net.load_state_dict(state_dict)
    net.reset_head(num_classes)
    if not finetune.head_zero_init:
        nn.init.trunc_normal_(net.head.weight, std=0.02)
    log.info("fine-tuning from %s (%s): %d classes -> %d", finetune.source or source, source,
             source_config["num_classes"], num_classes)
    return net


def build_loss(name: str) -> LossFn:
    """softmax cross-entropy (hard or soft labels), or big_vision's sigmoid cross-entropy summed over
    classes (the paper's choice for multi-label JFT / ImageNet-21k pre-training).

    Label smoothing and mixup are the data pipeline's (data.augment): it then yields soft targets.
    """
    if name not in LOSSES:
        raise ValueError(f"trainer.loss={name!r}: expected one of {', '.join(LOSSES)}")

    def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = F.one_hot(labels, logits.shape[-1]).float() if labels.dtype == torch.long else labels.float()
        per_class = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return per_class.sum(dim=-1).mean()

    return softmax_xent if name == "softmax_xent" else sigmoid_xent
