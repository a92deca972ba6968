"""vitscale.engine.grad_reduce on 2 gloo ranks: the bucketed, overlapped all-reduce averages exactly
what a plain all-reduce after backward averages, fills unused parameters with zeros (as DeepSpeed
does), and stays idle on backward passes it was not armed for (gradient accumulation)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from vitscale.engine.grad_reduce import OverlappedGradReduce


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)  # registered first, like a ViT's cls token under GAP: the last bucket
        self.a, self.b, self.c = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _run(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = _Net()
    x = [torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * rank + k)) for k in range(2)]
    # Reference: two accumulated micro-batches, then one all-reduce, averaged.
    for xi in x:
        net(xi).square().mean().backward()
    net.unused.weight.grad = torch.zeros_like(net.unused.weight)
    net.unused.bias.grad = torch.zeros_like(net.unused.bias)
    for p in net.parameters():
        dist.all_reduce(p.grad)
        p.grad.mul_(0.5)
    expected = _grads(net)
    net.zero_grad(set_to_none=True)
    # Small buckets: several transfers, the first launched while backward still runs.
    reduce = OverlappedGradReduce(net, first_bucket_bytes=4 * 64 * 3, bucket_bytes=4 * 64 * 64)
    assert len(reduce.buckets) >= 3
    net(x[0]).square().mean().backward()  # not armed: a plain local accumulation
    reduce.arm()
    net(x[1]).square().mean().backward()
    launched_in_backward = len(reduce.pending)
    reduce.finish()
    got = _grads(net)
    reduce.remove()
    ok = all(torch.equal(got[n], expected[n]) for n in expected)
    out[rank] = (ok, launched_in_backward, len(reduce.buckets))
    dist.destroy_process_group()


def test_bucketed_overlapped_reduce_equals_one_all_reduce_after_backward() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_run, args=(port, out), nprocs=2)
        results = dict(out)
    for rank, (ok, launched, buckets) in results.items():
        assert ok, f"rank {rank}: overlapped gradients differ from the reference"
        # Every bucket but the one holding the unused layer (launched by finish) went during backward.
        assert 0 < launched < buckets, (rank, launched, buckets)
