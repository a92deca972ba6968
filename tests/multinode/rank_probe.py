"""A Trainer callback that records, on every rank, where the rank ran and what parameters it holds.

The multi-node tests need two facts only each rank knows: which host it sat on (the address it reaches
the master from, and its network namespace) and a checksum of its full parameters after a step (equal on
every rank when data parallelism works). It writes one JSON file per rank and checkpoint:
``output_dir/rank_probe/<tag>/rank_<R>.json``. It uses only the Trainer's public callback hook.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

import torch


def outbound_address(master_addr: str, master_port: int) -> str:
    """The local address this host uses to reach the master (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((master_addr, master_port))
        return str(sock.getsockname()[0])


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def full_parameters_sha256(engine: Any) -> str:
    """Checksum of the whole model; under ZeRO-3 the partitions are gathered first (collective)."""
    module = engine.module
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return state_sha256({k: v.clone() for k, v in module.state_dict().items()})
    return state_sha256(module.state_dict())


class RankProbe:
    """Writes ``rank_probe/<tag>/rank_<R>.json`` after each checkpoint (every rank takes part)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_checkpoint(self, step: int, ckpt_dir: str, metrics: Mapping[str, Any]) -> None:
        trainer = self.trainer
        info = trainer.dist
        record = {
            "rank": info.rank,
            "world_size": info.world_size,
            "launcher": info.launcher,
            "step": step,
            "addr": outbound_address(os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "1"))),
            "netns_inode": os.stat("/proc/self/ns/net").st_ino,
            "param_sha256": full_parameters_sha256(trainer.engine),
        }
        out = Path(trainer.output_dir) / "rank_probe" / Path(ckpt_dir).name / f"rank_{info.rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out)  # a test polling for the file never reads half of it
