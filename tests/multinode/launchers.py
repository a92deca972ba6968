"""Command lines for the three ways users start vitscale on several machines.

These are the commands docs/cluster.md tells users to type on real hosts; here each one runs inside a
namespace host. They only build argv lists: starting and cleaning up is twohosts.Host's job.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def torchrun(
    script: Path | str, args: Sequence[str], *, nnodes: int, node_rank: int, nproc_per_node: int,
    master_addr: str, master_port: int,
) -> list[str]:
    """`torchrun --nnodes N --node_rank R` with a static rendezvous at the master; no elastic restarts."""
    return [
        "torchrun", f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
        f"--master_addr={master_addr}", f"--master_port={master_port}", "--max_restarts=0",
        str(script), *args,
    ]


def write_hostfile(path: Path, hosts: Sequence[tuple[str, int]]) -> Path:
    """DeepSpeed hostfile: one `name slots=N` line per host (names only label the nodes with --no_ssh)."""
    path.write_text("".join(f"{name} slots={slots}\n" for name, slots in hosts))
    return path


def deepspeed(
    script: Path | str, args: Sequence[str], *, hostfile: Path, node_rank: int, master_addr: str,
    master_port: int,
) -> list[str]:
    """The DeepSpeed multi-node launcher without ssh/pdsh: one invocation per host, each with its rank."""
    return [
        "deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node_rank}",
        f"--master_addr={master_addr}", f"--master_port={master_port}", str(script), *args,
    ]


def ray_head(*, addr: str, port: int, num_cpus: int, temp_dir: Path, trial_slots: int = 1) -> list[str]:
    """A Ray head that stays in the foreground (`--block`), so the harness owns its lifetime.

    `trial_slot` is the custom resource launch/sweep.py's trials hold instead of a CPU (launch/cluster.py).
    """
    return [
        "ray", "start", "--head", f"--node-ip-address={addr}", f"--port={port}", f"--num-cpus={num_cpus}",
        f'--resources={{"trial_slot": {trial_slots}}}', f"--temp-dir={temp_dir}", "--include-dashboard=false",
        "--disable-usage-stats", "--block",
    ]


def ray_worker(*, head: str, addr: str, num_cpus: int, temp_dir: Path) -> list[str]:
    """A Ray worker node joining `head` (host:port), in the foreground like the head.

    Its own temp dir: on real machines /tmp/ray is per host; the namespace hosts share one /tmp.
    """
    return [
        "ray", "start", f"--address={head}", f"--node-ip-address={addr}", f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block",
    ]
