"""Exact top-k over a sharded validation set, in lock-step across ranks.

Top-k counts are summed over ranks, so the number is exact over the whole set however it was split.
Under ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so a rank that
runs out of data early would hang the others: every rank therefore runs the same number of forwards,
and a rank without data forwards a dummy batch whose outputs are discarded.

Library code (the engine's evaluation and ``python -m vitscale.evaluate`` both call it): torch only,
no CLI, no tracking.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0


class EvalProgress:
    """Rank 0's console progress of a long evaluation: one line per ``every_s`` seconds of wall time
    (none for an evaluation shorter than that), and a closing line when any progress line was printed.

    Counts are rank 0's own, scaled by the world size (shown with ``~``): no collective, no host sync
    beyond the evaluation's own per-batch read-backs. ``total`` is what manifest.json lists for rank 0's
    shards (``EvalLoader.expected``); without it the line has no percentage and no ETA.
    """

    def __init__(self, every_s: float, *, total: int | None, world_size: int = 1, logger: logging.Logger = log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.total, self.world = float(every_s), total, max(1, int(world_size))
        self.log, self.clock = logger, clock
        self.start = self.last = clock()
        self.lines = 0

    def _n(self, n: float) -> str:
        return f"{'~' if self.world > 1 else ''}{int(n * self.world):,}"

    def update(self, count: int) -> None:
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last, self.lines = now, self.lines + 1
        elapsed = max(now - self.start, 1e-9)
        rate = count / elapsed
        line = f"eval: {self._n(count)}"
        if self.total:
            pct = 100.0 * count / self.total
            eta = (self.total - count) / rate if rate > 0 else float("nan")
            line += f"/{self._n(self.total)} images ({pct:.0f} %), {self._n(rate)} img/s, ETA {eta:.0f} s"
        else:
            line += f" images, {self._n(rate)} img/s"
        self.log.info("%s", line)

    def done(self, count: int) -> None:
        if not self.lines:  # short evaluation: the caller's result line is enough
            return
        elapsed = max(self.clock() - self.start, 1e-9)
        self.log.info("eval: done, %s images in %.0f s (%s img/s)", self._n(count), elapsed, self._n(count / elapsed))

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(device: torch.device | str | None) -> torch.device:
    """Where collective tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    if device is not None and torch.device(device).type != "meta":
        return torch.device(device)
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def evaluate_topk(
    forward_fn: ForwardFn,
    loader: Iterable[Mapping[str, Any]],
    *,
    topk: Sequence[int] = (1, 5),
    device: torch.device | str | None = None,
    input_shape: Sequence[int] | None = None,
    progress_every_s: float | None = PROGRESS_EVERY_S,
) -> dict[str, float]:
    """{"top1", "top5", ..., "loss", "count"} over every sample of every rank's `loader`.

    `loader` yields {"image": (B, C, H, W), "label": (B,) or one-hot/soft (B, K)}; `forward_fn` maps
    images to logits (it moves/casts them). `input_shape` (C, H, W) shapes the dummy batch of a rank
    that has no data at all; otherwise its last real batch is reused. Rank 0 logs a progress line
    every `progress_every_s` seconds (0: every batch; None: never), see EvalProgress.
    """
    ks = sorted({int(k) for k in topk})
    if not ks or ks[0] < 1:
        raise ValueError(f"topk must be positive integers, got {list(topk)}")
    comm = _comm_device(device)
    distributed = _distributed()
    correct = torch.zeros(len(ks), dtype=torch.float64)
    count, loss_sum = 0, 0.0
    template: torch.Tensor | None = None
    rank0 = not distributed or dist.get_rank() == 0
    progress = None
    if progress_every_s is not None and rank0:
        total = getattr(loader, "expected", None)  # EvalLoader: manifest count of this rank's shards
        progress = EvalProgress(progress_every_s, total=total if isinstance(total, int) else None,
                                world_size=dist.get_world_size() if distributed else 1)
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if distributed:
            flag = torch.tensor([0 if batch is None else 1], device=comm)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) == 0:
                break
        elif batch is None:
            break
        if batch is None:  # lock-step filler: same collectives as the ranks that still have data
            if template is None:
                if input_shape is None:
                    raise ValueError("evaluate_topk: this rank has no validation data; pass input_shape=(C, H, W) "
                                     "so it can forward a dummy batch in lock-step with the others")
                template = torch.zeros(1, *input_shape)
            forward_fn(template)
            continue
        images, labels = batch["image"], batch["label"]
        template = images[:1]
        logits = forward_fn(images).float()
        labels = labels.to(logits.device)
        if labels.ndim == 2:  # one-hot / smoothed targets: the class is the argmax
            labels = labels.argmax(dim=1)
        maxk = min(ks[-1], logits.shape[1])
        hits = logits.topk(maxk, dim=1).indices.eq(labels[:, None])
        for i, k in enumerate(ks):
            correct[i] += hits[:, :min(k, maxk)].any(dim=1).sum().item()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.shape[0]
        if progress is not None:
            progress.update(count)
    if progress is not None:
        progress.done(count)
    totals = torch.cat([correct, torch.tensor([count, loss_sum], dtype=torch.float64)]).to(comm)
    if distributed:
        dist.all_reduce(totals)
    totals = totals.cpu()
    n = int(totals[-2].item())
    if n == 0:
        raise ValueError("evaluate_topk: the validation loader yielded no samples on any rank")
    out = {f"top{k}": float(totals[i] / n) for i, k in enumerate(ks)}
    out |= {"loss": float(totals[-1] / n), "count": float(n)}
    return out

