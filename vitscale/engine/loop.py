"""The step loop proper: micro-batches through the DeepSpeed engine, NaN guard, logging, checkpoints.

The host never waits for the device outside log steps: the loss, the gradient norm and the NaN
guard's counters stay device tensors (``WindowStats``) and are read back, after one all-reduce,
only when a record is logged, a checkpoint is written, or every ``nan_patience`` steps (so a
diverged run still stops at most ``nan_patience - 1`` steps after its ``nan_patience``-th bad step
in a row). Throughput is wall time between two read-backs, which on CUDA are synchronising, so the
window's time is exact without a ``torch.cuda.synchronize`` per step. What DeepSpeed itself reads
back per step is listed in docs/training.md.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from vitscale.engine.evaluation import run_eval
from vitscale.engine.metrics import StepTimer

if TYPE_CHECKING:
    from vitscale.engine.trainer import Trainer

log = logging.getLogger(__name__)
_INPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """``trainer.nan_patience`` non-finite steps in a row; a checkpoint was saved before raising."""


class WindowStats:
    """What the loop logs, accumulated on the device between two read-backs.

    ``run`` (bad steps in a row) spans windows; ``max_run`` is its largest value in the window, so a
    run of bad steps that ended between two read-backs is still seen.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.max_run = torch.zeros((), dtype=torch.int64, device=device)
        self.grad_norm: torch.Tensor | float | None = None

    def add_step(self, loss_sum: torch.Tensor, micro_batches: int, bad: torch.Tensor) -> None:
        """Account one optimizer step; ``bad`` is a 0-d bool tensor (no host read)."""
        good = (~bad).to(torch.float64)
        self.loss_sum += loss_sum * good
        self.loss_count += good * micro_batches
        self.skipped += bad.to(torch.int64)
        self.run = (self.run + 1) * bad.to(torch.int64)
        self.max_run = torch.maximum(self.max_run, self.run)

    def read(self) -> dict[str, float]:
        """Collective: every rank's window, reduced and read back (the one host sync of a window)."""
        sums = torch.stack([self.loss_sum, self.loss_count])
        runs = torch.stack([self.skipped, self.max_run, self.run])  # a step bad on one rank is bad
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(runs, op=dist.ReduceOp.MAX)
        loss_sum, loss_count = sums.tolist()
        skipped, max_run, run = runs.tolist()
        norm = self.grad_norm
        out = {
            "loss": loss_sum / loss_count if loss_count else float("nan"),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "skipped": int(skipped),
            "max_run": int(max_run),
        }
        self.loss_sum.zero_(), self.loss_count.zero_(), self.skipped.zero_()
        self.run.fill_(int(run))  # every rank continues from the same count
        self.max_run.copy_(self.run)
        return out


def _clip_or_skip(engine: Any, optimizer: torch.optim.Optimizer, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeRO-0 fp32 (gradients already all-reduced in ``param.grad``): clip with torch and skip a step
    whose norm is not finite. Returns (norm before clipping, skipped) as device tensors.

    The skip stays on the device when the optimizer takes ``found_inf`` (torch's fused AdamW, as AMP's
    GradScaler uses it); otherwise the gradients are dropped after one host read of the norm.
    """
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    skipped = ~torch.isfinite(norm)
    if takes_found_inf(optimizer):
        optimizer.found_inf = skipped.to(torch.float32)  # type: ignore[attr-defined]
    elif bool(skipped):  # documented host read: SGD has no device-side skip
        for p in params:
            p.grad = None
    return norm, skipped


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW skip their update on the device when ``optimizer.found_inf`` is 1."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def train_step(trainer: "Trainer", batches: Iterator[dict[str, Any]], timer: StepTimer, stats: WindowStats) -> None:
    """One optimizer step over ``accumulation`` micro-batches, accounted in ``stats`` on the device."""
    engine, device = trainer.engine, trainer.dist.device
    dtype = _INPUT_DTYPES[trainer.precision]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    skipped = torch.zeros((), dtype=torch.bool, device=device)
    images = 0
    data_s = 0.0
    for micro in range(trainer.accumulation):
        t0 = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - t0
        images_t = batch["image"].to(device, dtype=dtype, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        loss = trainer.loss_fn(engine(images_t), labels)
        value = loss.detach().to(torch.float64)
        finite = torch.isfinite(value)
        loss_sum += torch.where(finite, value, 0.0)
        nonfinite |= ~finite
        last = micro == trainer.accumulation - 1
        if last and trainer.grad_reduce is not None:
            trainer.grad_reduce.arm()  # this backward's gradients are all-reduced as they come
        engine.backward(loss)
        if last and trainer.loop_clips:
            if trainer.grad_reduce is not None:
                trainer.grad_reduce.finish()
            # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers clip, and skip a step whose gradient norm
            # is not finite, themselves; for ZeRO-0 fp32 the loop does both (deepspeed_config).
            stats.grad_norm, skipped = _clip_or_skip(engine, trainer.optimizer, trainer.grad_clip)
        engine.step()
        images += images_t.shape[0]
    timer.add(data_s, images)
    if not trainer.loop_clips:
        stats.grad_norm = engine.get_global_grad_norm()  # DeepSpeed's value (a float or a tensor)
    # fp16's dynamic loss scaling skips overflowing steps by design: not a bad step.
    not_applied = not engine.was_step_applied() and trainer.precision != "fp16"
    bad = nonfinite | skipped | not_applied
    stats.add_step(loss_sum, trainer.accumulation, bad)


def run_loop(trainer: "Trainer", batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Train to ``trainer.max_steps``, evaluating, logging and checkpointing on the way."""
    job, engine = trainer.job, trainer.engine
    tc = job.trainer
    max_steps, log_every = tc.max_steps, max(tc.log_every, 1)
    ckpt_every, eval_every = tc.checkpoint_every, job.eval.every if job.eval is not None else 0
    patience = tc.nan_patience
    register_every = job.tracking.register_every  # a multiple of checkpoint_every (validated)
    timer, stats = StepTimer(), WindowStats(trainer.dist.device)
    last: dict[str, Any] = {"step": trainer.step}
    last_ckpt = None
    window_start = trainer.step
    engine.train()
    while trainer.step < max_steps:
        lr = float(engine.get_lr()[0])  # a Python float: the LR this step applies
        train_step(trainer, batches, timer, stats)
        trainer.step += 1
        log_now = trainer.step % log_every == 0 or trainer.step == max_steps
        ckpt_now = ckpt_every > 0 and trainer.step % ckpt_every == 0
        guard_now = patience > 0 and trainer.step % patience == 0
        if log_now or ckpt_now or guard_now:
            window = stats.read()
            trainer.nan_skips += window["skipped"]
            if window["skipped"]:
                log.warning("steps %d-%d: %d skipped (non-finite loss or gradient), %d in a row at most, "
                            "%d in total", window_start + 1, trainer.step, window["skipped"], window["max_run"],
                            trainer.nan_skips)
            window_start = trainer.step
            if log_now:
                record = {"step": trainer.step, "loss": window["loss"], "lr": lr, "grad_norm": window["grad_norm"],
                          "nan_skips": trainer.nan_skips, **trainer.throughput(timer),
                          "peak_mem": trainer.memory_bytes()}
                trainer.log_record(record)
                last = record
            if window["max_run"] >= patience > 0:
                ref = trainer.save_checkpoint(last)
                raise TrainingDiverged(
                    f"{window['max_run']} non-finite steps in a row (trainer.nan_patience={patience}) by step "
                    f"{trainer.step}; checkpoint saved to {ref.path}. Lower optim.lr, raise the warm-up, or "
                    f"use trainer.precision=fp32, then resume={ref.root}")
        if eval_every > 0 and trainer.step % eval_every == 0 and trainer.step < max_steps:
            last.update(run_eval(trainer))
            engine.train()
            timer.restart()  # evaluation time is not training throughput
        if ckpt_now:
            last_ckpt = trainer.save_checkpoint(last)
            if register_every > 0 and trainer.step % register_every == 0 and trainer.step < max_steps:
                trainer.finish_export(trainer.export(last_ckpt), last)
            timer.restart()
    # Checkpoint and export before the final evaluation: an evaluation that fails must not cost the
    # last steps or the export; registering waits for the evaluation's metrics (the `best` alias).
    if last_ckpt is None or last_ckpt.tag != f"step_{trainer.step:08d}":
        last_ckpt = trainer.save_checkpoint(last)
    out = trainer.export(last_ckpt) if tc.export_at_end else None
    if job.eval is not None:
        last.update(run_eval(trainer))
    if out is not None:
        last["export_dir"] = str(out)
        trainer.finish_export(out, last)
        trainer.log_figures(out)
    last["step"] = trainer.step
    return last
