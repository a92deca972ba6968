"""Training engine: DeepSpeed ZeRO loop, its config, checkpoints, schedules and metrics."""
from vitscale.engine.deepspeed_config import BatchPlan, batch_plan
from vitscale.engine.trainer import Trainer, TrainingDiverged

__all__ = ["BatchPlan", "Trainer", "TrainingDiverged", "batch_plan"]
