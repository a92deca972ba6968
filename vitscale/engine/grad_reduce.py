"""ZeRO-0 gradient all-reduce overlapped with the backward pass, in buckets, as torch DDP does it.

Why: DeepSpeed's ZeRO-0 engine all-reduces every gradient in one collective after the backward
pass (`buffered_allreduce_fallback`), so the step waits for the whole transfer; its ZeRO-1/2
`overlap_comm` relies on CUDA streams and is synchronous on CPU. torch DDP instead launches an
asynchronous all-reduce per bucket as soon as backward has produced the bucket's gradients, and
the transfer runs while backward computes the rest. DDP cannot wrap a module that DeepSpeed owns,
so this is that reducer for the DeepSpeed engine: measured on 2 CPU ranks (bench_e2e's ViT, gloo),
the non-overlapped all-reduce was 7.5 % of a rank's step (py-spy), and plain-torch DDP on the
same layout ran as fast as one process with both cores.

Numerics are DeepSpeed's: each bucket is summed over ranks and then scaled by 1 / world (its
default post-scaling), elementwise, so the parameters are bitwise those of DeepSpeed's reduction.
Only the ZeRO-0 fp32 path uses it (`loop_clips_gradients`): there DeepSpeed's optimizer is the
plain torch one and gradients live in `param.grad`; bf16/fp16 ZeRO-0 keep their own fp32 buffers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

FIRST_BUCKET_BYTES = 1 << 20  # small, so that the first transfer starts early (DDP's choice)
BUCKET_BYTES = 25 << 20  # DDP's bucket_cap_mb


class OverlappedGradReduce:
    """Buckets the parameters in reverse registration order (the order backward reaches them in a
    feed-forward model) and all-reduces each bucket asynchronously once all its gradients are
    accumulated. Buckets are launched strictly in order, so every rank issues the same sequence of
    collectives whatever order its hooks fire in; a parameter backward never reaches (zero-filled at
    `finish`) therefore holds back its bucket and the ones after it, which is harmless for a ViT
    (its only candidates, e.g. a cls token under GAP pooling, are registered first: the last bucket)."""

    def __init__(self, module: torch.nn.Module, group: Any = None,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        params = [p for p in module.parameters() if p.requires_grad and p.numel() > 0]
        self.buckets: list[list[torch.nn.Parameter]] = []
        size, cap = 0, first_bucket_bytes
        for p in reversed(params):
            if not self.buckets or size + p.numel() * p.element_size() > cap and self.buckets[-1]:
                if self.buckets:
                    cap = bucket_bytes
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.armed = False
        self.missing: list[int] = []
        self.next_launch = 0
        self.pending: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def arm(self) -> None:
        """Call before the backward whose gradients are to be reduced (the last micro-batch)."""
        self.armed = True
        self.missing = [len(b) for b in self.buckets]
        self.next_launch = 0
        self.pending = []

    def _ready(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        i = self.bucket_of[id(param)]
        self.missing[i] -= 1
        while self.next_launch < len(self.buckets) and self.missing[self.next_launch] == 0:
            self._launch(self.next_launch)
            self.next_launch += 1

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        for p in bucket:  # a parameter backward did not reach: zeros, as DeepSpeed's reduction does
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self.pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, bucket))

    def finish(self) -> None:
        """After backward: launch what backward did not complete, wait, write the averages back."""
        if not self.armed:
            return
        self.armed = False
        for i in range(self.next_launch, len(self.buckets)):
            self._launch(i)
        for work, flat, bucket in self.pending:
            work.wait()
            flat.mul_(1.0 / self.world)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self.pending = []

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
