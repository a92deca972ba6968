"""Harness self-test payload: a few DDP steps over gloo, then one JSON line per rank.

Run under torchrun (env:// rendezvous). Each rank writes OUT/rank<R>.json with the address it reaches the
master from and a checksum of its parameters, so the harness test can prove two things without any
vitscale code: ranks really sat on both hosts, and gradients were all-reduced across the veth link.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def outbound_address(master_addr: str, master_port: int) -> str:
    """The local address used to reach the master (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((master_addr, master_port))
        return sock.getsockname()[0]


def parameter_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # different data per rank; DDP broadcasts rank 0's initial weights
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(args.steps):
        loss = model(torch.randn(8, 16)).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()

    record = {
        "rank": rank,
        "world_size": world,
        "addr": outbound_address(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])),
        "param_sha256": parameter_sha256(model.module),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
