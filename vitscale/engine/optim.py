"""The optimizer handed to DeepSpeed: torch's AdamW / SGD, or DeepSpeedCPUAdam under CUDA offload.

The optimizer is built here rather than in the DeepSpeed JSON because DeepSpeed's JSON optimizers
are its fused CUDA kernels (they do not exist on a CPU host); torch's are exact on both, and fused
when CUDA is present.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, weight_decay: float, decay_1d_params: bool) -> list[dict[str, Any]]:
    """One group, or two when biases / norm scales / embeddings (1-D or pos/cls tokens) skip decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d_params or weight_decay == 0.0:
        return [{"params": params, "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: Any, *, device: torch.device, offload: bool) -> torch.optim.Optimizer:
    """Optimizer for ``optim`` (configs/optim/*.yaml); ``offload``: ZeRO moves its states to CPU."""
    name = optim.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, float(optim.weight_decay), bool(optim.get("decay_1d_params", True)))
    lr = float(optim.lr)
    if name == "adamw":
        betas = tuple(float(b) for b in optim.betas)
        if offload and device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=float(optim.eps), adamw_mode=True)
        # Fused on CPU too: one kernel per step, and it skips a non-finite step on the device
        # (``found_inf``), which keeps the loop free of host syncs (engine/loop.py).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(optim.eps), fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=float(optim.momentum or 0.0))
