"""Activation checkpointing policies for the transformer blocks.

The model only knows ``set_checkpointing(fn, every)``; which library recomputes the block is chosen
here, from ``trainer.activation_checkpointing``:

- ``torch``: ``torch.utils.checkpoint`` non-reentrant (works with ZeRO-3's parameter hooks, replays
  the dropout RNG) - the default choice.
- ``deepspeed``: ``deepspeed.checkpointing`` (can partition the saved activations across model-parallel
  ranks and offload them; configured from the same DeepSpeed JSON).
- ``fairscale_offload``: fairscale's ``checkpoint_wrapper(offload_to_cpu=True)`` keeps the saved block
  inputs in host memory, trading PCIe traffic for GPU memory. This is where the framework uses
  fairscale: its FullyShardedDataParallel does not run on CPU (FACTS.md), so sharding is DeepSpeed's.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

POLICIES = ("none", "torch", "deepspeed", "fairscale_offload")
CheckpointFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _torch_fn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch_checkpoint(block, x, use_reentrant=False)


def _deepspeed_fn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import deepspeed

    return deepspeed.checkpointing.checkpoint(block, x)


def apply_policy(model: nn.Module, policy: str, every: int, ds_config: dict[str, Any] | None = None) -> None:
    """Install ``policy`` on ``model`` (blocks 0, every, 2*every, ...); ``none`` removes it."""
    if policy not in POLICIES:
        raise ValueError(
            f"trainer.activation_checkpointing.policy={policy!r}: expected one of {', '.join(POLICIES)}")
    if every < 1:
        raise ValueError(f"trainer.activation_checkpointing.every={every}: expected >= 1")
    if policy == "none":
        model.set_checkpointing(None)
    elif policy == "torch":
        model.set_checkpointing(_torch_fn, every)
    elif policy == "deepspeed":
        import deepspeed

        # Options (partition_activations, cpu_checkpointing, ...) come from the DeepSpeed JSON's
        # "activation_checkpointing" block (deepspeed.extra); without one the defaults are plain recompute.
        if ds_config and "activation_checkpointing" in ds_config:
            deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        model.set_checkpointing(_deepspeed_fn, every)
    else:
        from fairscale.nn.checkpoint import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            if i % every == 0:
                checkpoint_wrapper(block, offload_to_cpu=True)  # patches block.forward in place
        model.set_checkpointing(None)


__all__ = ["POLICIES", "CheckpointFn", "apply_policy"]
