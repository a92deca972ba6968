"""Learning-rate schedules as DeepSpeed ``scheduler`` blocks.

DeepSpeed already implements the two schedules the paper uses (linear warm-up then linear decay for
pre-training, warm-up then cosine for fine-tuning) and checkpoints their state with the engine, so we
only translate ``optim.schedule`` into its JSON instead of writing the maths again.
"""
from __future__ import annotations

from typing import Any

from vitscale.config import ScheduleConfig

SCHEDULES = ("warmup_linear_decay", "warmup_cosine", "constant")


def scheduler_config(schedule: ScheduleConfig, base_lr: float, total_steps: int) -> dict[str, Any] | None:
    """DeepSpeed ``scheduler`` block for ``optim.schedule`` (``None``: constant LR, no scheduler).

    ``total_steps`` counts optimizer steps (DeepSpeed steps its scheduler once per applied step).
    """
    name = schedule.name
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule.name={name!r}: expected one of {', '.join(SCHEDULES)}")
    if name == "constant":
        return None
    warmup = int(schedule.warmup_steps)
    if warmup < 1:
        raise ValueError(f"optim.schedule.warmup_steps={warmup}: expected >= 1 (DeepSpeed needs a warm-up)")
    if name == "warmup_linear_decay":
        # Decays linearly to exactly 0 at total_steps, as in the paper.
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": int(total_steps),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": float(base_lr),
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": int(total_steps),
            "warmup_min_ratio": 0.0,
            "warmup_num_steps": warmup,
            "cos_min_ratio": float(schedule.min_lr_ratio),
            "warmup_type": "linear",
        },
    }


def sync_lr_after_load(engine: Any) -> None:
    """Put the resumed schedule's LR back into the optimizer.

    DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR ``load_state_dict`` restore the iteration
    count only; the optimizer keeps the LR set at construction (iteration -1, i.e. 0) until the next
    ``step()``, so the first step after a resume would silently run at LR 0.
    """
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or getattr(scheduler, "last_batch_iteration", -1) < 0:
        return
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
