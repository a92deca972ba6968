"""The step loop proper: micro-batches through the DeepSpeed engine, NaN guard, logging, checkpoints.

Split from trainer.py so the set-up (what is trained) and the loop (how a step runs) read separately.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from vitscale.engine.metrics import StepTimer

if TYPE_CHECKING:
    from vitscale.engine.trainer import Trainer

log = logging.getLogger(__name__)
_INPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _clip_or_drop_gradients(engine: Any, max_norm: float) -> tuple[float, bool]:
    """ZeRO-0 fp32 (gradients already all-reduced in ``param.grad``): clip with torch, or drop them all
    when their norm is not finite (a torch optimizer leaves parameters whose .grad is None untouched).
    Returns (norm before clipping, dropped)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    if math.isfinite(norm):
        return norm, False
    for p in params:
        p.grad = None
    return norm, True


def train_step(trainer: "Trainer", batches: Iterator[dict[str, Any]], timer: StepTimer) -> tuple[float, float, bool]:
    """One optimizer step over ``accumulation`` micro-batches -> (mean loss over ranks, grad norm, applied)."""
    engine, info = trainer.engine, trainer.dist
    assert info is not None
    dtype = _INPUT_DTYPES[trainer.precision]
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of micro losses, non-finite count)
    own_skip = False
    grad_norm = float("nan")
    images = 0
    data_s = compute_s = 0.0
    for micro in range(trainer.accumulation):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        images_t = batch["image"].to(info.device, dtype=dtype, non_blocking=True)
        labels = batch["label"].to(info.device, non_blocking=True)
        logits = engine(images_t)
        loss = trainer.loss_fn(logits, labels)
        value = float(loss.detach())
        loss_sum[0] += value if math.isfinite(value) else 0.0
        loss_sum[1] += 0.0 if math.isfinite(value) else 1.0
        engine.backward(loss)
        if micro == trainer.accumulation - 1 and trainer.loop_clips:
            # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers clip, and skip a step whose gradient norm
            # is not finite, themselves; for ZeRO-0 fp32 the loop does both (deepspeed_config).
            grad_norm, own_skip = _clip_or_drop_gradients(engine, trainer.grad_clip)
        engine.step()
        images += images_t.shape[0]
        data_s += t1 - t0
        compute_s += time.perf_counter() - t1
    dist.all_reduce(loss_sum)  # global mean loss for the log, and every rank sees every bad loss
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    timer.add(data_s, compute_s, images)
    finite_micro = trainer.accumulation * info.world_size - loss_sum[1].item()
    mean_loss = loss_sum[0].item() / finite_micro if finite_micro else float("nan")
    if loss_sum[1].item() > 0:
        mean_loss = float("nan")
    norm = engine.get_global_grad_norm()
    if norm is not None:
        grad_norm = float(norm)
    overflow_is_routine = trainer.precision == "fp16"  # dynamic loss scaling skips by design
    applied = engine.was_step_applied() and not own_skip
    bad = loss_sum[1].item() > 0 or own_skip or (not applied and not overflow_is_routine)
    return mean_loss, grad_norm, not bad


def run_loop(trainer: "Trainer", batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Train to ``trainer.max_steps``, evaluating, logging and checkpointing on the way."""
    from vitscale.engine.evaluation import run_eval
    from vitscale.engine.trainer import TrainingDiverged

    cfg, info, engine = trainer.cfg, trainer.dist, trainer.engine
    assert info is not None
    tc = cfg.trainer
    max_steps, log_every = int(tc.max_steps), max(int(tc.log_every), 1)
    ckpt_every, eval_every = int(tc.checkpoint_every), int(cfg.eval.every)
    patience = int(tc.nan_patience)
    register_every = int(cfg.tracking.get("register_every") or 0)  # a multiple of checkpoint_every
    timer, window_losses = StepTimer(), []
    in_a_row = 0
    last: dict[str, Any] = {"step": trainer.step}
    last_ckpt = None
    engine.train()
    while trainer.step < max_steps:
        lr = float(engine.get_lr()[0])  # the LR this step applies (DeepSpeed advances it in step())
        loss, grad_norm, ok = train_step(trainer, batches, timer)
        trainer.step += 1
        if ok:
            in_a_row = 0
            window_losses.append(loss)
        else:
            in_a_row += 1
            trainer.nan_skips += 1
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in total)",
                        trainer.step, in_a_row, trainer.nan_skips)
        if trainer.step % log_every == 0 or trainer.step == max_steps:
            record = {
                "step": trainer.step,
                "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                "lr": lr,
                "grad_norm": grad_norm,
                "nan_skips": trainer.nan_skips,
                **trainer.throughput(timer),
                "peak_mem": trainer.memory_bytes(),
            }
            window_losses = []
            trainer.log_record(record)
            last = record
        if in_a_row >= patience > 0:
            ref = trainer.save_checkpoint(last)
            raise TrainingDiverged(
                f"{in_a_row} non-finite steps in a row (trainer.nan_patience={patience}) at step "
                f"{trainer.step}; checkpoint saved to {ref.path}. Lower optim.lr, raise the warm-up, or "
                f"use trainer.precision=fp32, then resume={ref.root}")
        if eval_every > 0 and trainer.step % eval_every == 0 and trainer.step < max_steps:
            last.update(run_eval(trainer))
            engine.train()
        if ckpt_every > 0 and trainer.step % ckpt_every == 0:
            last_ckpt = trainer.save_checkpoint(last)
            if register_every > 0 and trainer.step % register_every == 0 and trainer.step < max_steps:
                trainer.finish_export(trainer.export(last_ckpt), last)
    if cfg.get("eval") is not None:
        last.update(run_eval(trainer))
    if last_ckpt is None or last_ckpt.tag != f"step_{trainer.step:08d}":
        last_ckpt = trainer.save_checkpoint(last)
    if tc.export_at_end:
        out = trainer.export(last_ckpt)
        last["export_dir"] = str(out)
        trainer.finish_export(out, last)
        trainer.log_figures(out)
    last["step"] = trainer.step
    return last
