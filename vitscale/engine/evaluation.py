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
    """Evaluate on ``data.val_shards`` (nothing when unset); logs ``eval/top1`` ... on rank 0."""
    cfg, info = trainer.cfg, trainer.dist
    assert info is not None
    urls = cfg.data.get("val_shards")
    if not urls:
        return {}
    from vitscale.data import build_eval_loader
    from vitscale.eval.topk import evaluate_topk

    loader = build_eval_loader(
        urls, batch_size=int(cfg.eval.batch_size), rank=info.rank, world_size=info.world_size,
        img_size=cfg.model.img_size, in_chans=int(cfg.model.in_chans),
        num_workers=int(cfg.data.num_workers), cfg_data=cfg.data)
    engine = trainer.engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision, torch.float32)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return engine(images.to(info.device, dtype=dtype)).float()

    engine.eval()
    with torch.no_grad():
        result = evaluate_topk(forward, loader, topk=tuple(cfg.eval.topk), device=info.device,
                               input_shape=(int(cfg.model.in_chans), *_hw(cfg.model.img_size)))
    metrics = {f"eval/{k}": float(v) for k, v in dict(result).items()}
    if info.is_main:
        trainer.tracker.log_metrics(metrics, trainer.step)
        trainer.metrics_file.write({"step": trainer.step, **metrics})
        log.info("step %d eval: %s", trainer.step, metrics)
    trainer.emit("on_eval", metrics, trainer.step)
    return metrics


def _hw(img_size: Any) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)
