"""Exact top-k over a sharded validation set, in lock-step across ranks.

Top-k counts are summed over ranks, so the number is exact over the whole set however it was split.
Under ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so a rank that
runs out of data early would hang the others: every rank therefore runs the same number of forwards,
and a rank without data forwards a dummy batch whose outputs are discarded.

Library code (the engine's evaluation and ``python -m vitscale.evaluate`` both call it): torch only,
no CLI, no tracking.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

ForwardFn = Callable[[torch.Tensor], torch.Tensor]

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
) -> dict[str, float]:
    """{"top1", "top5", ..., "loss", "count"} over every sample of every rank's `loader`.

    `loader` yields {"image": (B, C, H, W), "label": (B,) or one-hot/soft (B, K)}; `forward_fn` maps
    images to logits (it moves/casts them). `input_shape` (C, H, W) shapes the dummy batch of a rank
    that has no data at all; otherwise its last real batch is reused.
    """
    ks = sorted({int(k) for k in topk})
    if not ks or ks[0] < 1:
        raise ValueError(f"topk must be positive integers, got {list(topk)}")
    comm = _comm_device(device)
    distributed = _distributed()
    correct = torch.zeros(len(ks), dtype=torch.float64)
    count, loss_sum = 0, 0.0
    template: torch.Tensor | None = None
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

