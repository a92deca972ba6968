"""The loop's evaluation call site: exact top-k over the whole validation set, across ranks.

The evaluator itself (counting, padding ranks that run out of batches so ZeRO-3's collective
forwards stay in lock-step) is the library's ``vitscale.eval.topk.evaluate_topk`` (never the CLI
module); this module only supplies the engine's forward and the loader, and tags the results for the log.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vitscale.engine.trainer import Trainer

log = logging.getLogger(__name__)


def run_eval(trainer: "Trainer") -> dict[str, Any]:
    """Evaluate on ``data.val_shards`` (nothing when unset); logged through ``trainer.log_record``."""
    job, info = trainer.job, trainer.dist
    if not job.data.val_shards or job.eval is None:
        return {}
    from vitscale.data import build_eval_loader
    from vitscale.eval.topk import evaluate_topk

    loader = build_eval_loader(
        job.data.val_shards, batch_size=job.eval.batch_size, rank=info.rank, world_size=info.world_size,
        img_size=job.model.img_size, in_chans=job.model.in_chans, num_workers=job.data.num_workers,
        cfg_data=job.data)
    engine = trainer.engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision, torch.float32)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return engine(images.to(info.device, dtype=dtype)).float()

    engine.eval()
    with torch.no_grad():
        result = evaluate_topk(forward, loader, topk=tuple(job.eval.topk), device=info.device,
                               input_shape=(job.model.in_chans, *job.model.img_hw))
    metrics = {f"eval/{k}": float(v) for k, v in dict(result).items()}
    if info.is_main:
        log.info("step %d eval: %s", trainer.step, metrics)
    trainer.log_record({"step": trainer.step, **metrics})
    return metrics
