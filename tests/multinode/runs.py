"""Training runs across the namespace hosts: command lines for vitscale, and what a run left behind.

Every multi-node test trains the same tiny ViT on real Fashion-MNIST shards for a few steps with
DeepSpeed ZeRO; these helpers keep those settings in one place and read the evidence back: the per-rank
probe files (host, parameter checksum), metrics.jsonl and the checkpoint directory.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import launchers
from twohosts import Host, Launch, TwoHosts
from tiny_runs import TINY_VIT_RUN  # tests/ is on sys.path (rootdir conftest)


@dataclass(frozen=True)
class Shards:
    """Brace patterns (WebDataset URL syntax) of the suite's shared shard set."""

    train: str
    val: str


REPO = Path(__file__).resolve().parents[2]
PROBED_TRAIN = Path(__file__).with_name("probed_train.py")
# Seconds any one launch may take before `timeout` ends it; a run here takes 20-60 s on 2 busy cores.
LAUNCH_TIMEOUT_S = 240


def train_overrides(shards: str, output_dir: Path, *, max_steps: int, zero: int = 2,
                    checkpoint_every: int = 2, extra: Sequence[str] = ()) -> list[str]:
    """Hydra overrides for a tiny demo_pretrain run: 2 blocks of width 32, batch 16 per rank."""
    return [
        *TINY_VIT_RUN,
        "trainer.precision=fp32",  # ranks are compared bit for bit
        f"data.train_shards='{shards}'",
        f"output_dir={output_dir}",
        f"deepspeed=zero{zero}",
        f"trainer.max_steps={max_steps}",
        f"trainer.checkpoint_every={checkpoint_every}",
        "trainer.log_every=1",
        "trainer.global_batch_size=32",
        "trainer.micro_batch_size=16",
        "trainer.export_at_end=false",
        "optim.schedule.warmup_steps=1",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "data.shuffle_buffer=100",
        "tracking.enabled=false",
        *extra,
    ]


def torchrun_two_hosts(hosts: TwoHosts, args: Sequence[str], logs: Path, tag: str,
                       timeout_s: float = LAUNCH_TIMEOUT_S) -> list[Launch]:
    """`torchrun --nnodes 2 --node_rank N` on each host, one rank per host."""
    port = hosts.next_port()
    return [
        host.launch(
            launchers.torchrun(PROBED_TRAIN, args, nnodes=2, node_rank=rank, nproc_per_node=1,
                               master_addr=hosts.a.addr, master_port=port),
            log=logs / f"{tag}-node{rank}.log", timeout_s=timeout_s)
        for rank, host in enumerate(hosts.hosts)
    ]


def torchrun_one_host(host: Host, args: Sequence[str], logs: Path, tag: str, port: int,
                      nproc: int = 2, timeout_s: float = LAUNCH_TIMEOUT_S) -> Launch:
    """All ranks on one host, talking over its loopback only."""
    argv = launchers.torchrun(PROBED_TRAIN, args, nnodes=1, node_rank=0, nproc_per_node=nproc,
                              master_addr="127.0.0.1", master_port=port)
    return host.launch(argv, log=logs / f"{tag}-{host.name}.log", timeout_s=timeout_s,
                       env={"GLOO_SOCKET_IFNAME": "lo"})


def wait_ok(launches: Sequence[Launch]) -> None:
    """Every launch exits 0 (each is bounded by its `timeout` wrapper), else show all their logs."""
    codes = [launch.wait() for launch in launches]
    assert all(code == 0 for code in codes), "\n\n".join(launch.describe() for launch in launches)


def netns_inode(host: Host) -> int:
    return os.stat(f"/run/netns/{host.name}").st_ino


def rank_probes(output_dir: Path, step: int, world_size: int = 2) -> list[dict]:
    """The probe records every rank wrote after the checkpoint at `step`, in rank order."""
    folder = output_dir / "rank_probe" / f"step_{step:08d}"
    files = sorted(folder.glob("rank_*.json"))
    assert len(files) == world_size, f"expected {world_size} rank probes in {folder}, found {files}"
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


def assert_one_rank_per_host(probes: Sequence[dict], hosts: TwoHosts) -> None:
    """Rank r ran on host r: its address and its network namespace both say so."""
    assert [p["addr"] for p in probes] == [hosts.a.addr, hosts.b.addr], probes
    assert [p["netns_inode"] for p in probes] == [netns_inode(h) for h in hosts.hosts], probes


def assert_all_ranks_on(probes: Sequence[dict], host: Host) -> None:
    assert {p["netns_inode"] for p in probes} == {netns_inode(host)}, probes


def assert_same_parameters(probes: Sequence[dict]) -> None:
    assert len({p["param_sha256"] for p in probes}) == 1, f"ranks disagree on parameters: {probes}"


def metric_steps(output_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl (evaluation records carry no loss)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]


def latest_checkpoint_step(output_dir: Path) -> int | None:
    marker = output_dir / "checkpoints" / "latest"
    return int(marker.read_text().strip().removeprefix("step_")) if marker.is_file() else None


def _wait_until(ready: Callable[[], bool], what: str, launches: Sequence[Launch], timeout_s: float) -> None:
    """Poll `ready`; fail early, with every log, when a launch ends first (it would never come)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        ended = [x for x in launches if x.proc.poll() is not None]
        assert not ended, f"a launch ended before {what}:\n" + "\n\n".join(x.describe() for x in launches)
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


def wait_for(path: Path, launches: Sequence[Launch], timeout_s: float) -> None:
    """Until `path` exists (a rank wrote it) while `launches` run."""
    _wait_until(path.exists, f"{path}", launches, timeout_s)


def wait_for_text(launch: Launch, text: str, launches: Sequence[Launch], timeout_s: float) -> None:
    """Until `launch`'s log contains `text` while `launches` run."""
    _wait_until(lambda: text in launch.log_text(), f"{text!r} in {launch.log}", launches, timeout_s)
