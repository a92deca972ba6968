"""Training engine: DeepSpeed ZeRO loop, its config, checkpoints, schedules and metrics.

Attributes load lazily (PEP 562) so that ``vitscale.engine.checkpoint.layout``, which tracking and
launch read, does not import DeepSpeed and the Trainer with it.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"BatchPlan": "vitscale.engine.deepspeed_config", "batch_plan": "vitscale.engine.deepspeed_config",
            "Trainer": "vitscale.engine.trainer", "TrainingDiverged": "vitscale.engine.loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitscale.engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
