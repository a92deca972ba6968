"""The optimizer handed to DeepSpeed: torch's AdamW / SGD, or DeepSpeedCPUAdam under CUDA offload.

The optimizer is built here rather than in the DeepSpeed JSON because DeepSpeed's JSON optimizers
are its fused CUDA kernels (they do not exist on a CPU host); torch's are exact on both, and fused
when CUDA is present.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitscale.config import OptimConfig

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, weight_decay: float, decay_1d_params: bool) -> list[dict[str, Any]]:
    """One group, or two when 1-D parameters (biases, norm scales) and the names the model's
    ``no_weight_decay()`` lists (timm's convention: position embedding, class token) skip decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_1d_params or weight_decay == 0.0:
        return [{"params": params, "weight_decay": weight_decay}]
    exempt = set(getattr(model, "no_weight_decay", set)())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.rpartition("_orig_mod.")[2] in exempt  # torch.compile's wrapper prefix
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, *, device: torch.device, offload: bool) -> torch.optim.Optimizer:
    """Optimizer for ``optim`` (configs/optim/*.yaml); ``offload``: ZeRO moves its states to CPU."""
    name = optim.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, optim.weight_decay, optim.decay_1d_params)
    lr = optim.lr
    if name == "adamw":
        betas = tuple(float(b) for b in (optim.betas or (0.9, 0.999)))
        eps = 1e-8 if optim.eps is None else optim.eps
        if offload and device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        # Fused on CPU too: one kernel per step, and it skips a non-finite step on the device
        # (``found_inf``), which keeps the loop free of host syncs (engine/loop.py).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum or 0.0)
