"""`deepspeed --hostfile --no_ssh --node_rank N`: ZeRO-3 across two hosts, a dead host, and the resume.

One invocation of the DeepSpeed launcher per host, as on machines without ssh between them (or under a
scheduler that starts one task per node). The rank on host b is SIGKILLed after the first checkpoint:
host a's processes must end by themselves within a bounded time with an error that names the cause,
and a relaunch on both hosts continues from the last complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import launchers
import runs
from twohosts import Host, Launch, TwoHosts

# A surviving rank notices a dead peer as soon as its next collective touches the closed socket; this
# bound covers that plus the launcher's own teardown on a busy 2-core machine.
DEAD_PEER_BOUND_S = 60
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed")


def deepspeed_on_both_hosts(hosts: TwoHosts, hostfile: Path, args: list[str], logs: Path, tag: str) -> list[Launch]:
    port = hosts.next_port()
    return [
        host.launch(launchers.deepspeed(runs.PROBED_TRAIN, args, hostfile=hostfile, node_rank=rank,
                                        master_addr=hosts.a.addr, master_port=port),
                    log=logs / f"{tag}-node{rank}.log", timeout_s=runs.LAUNCH_TIMEOUT_S)
        for rank, host in enumerate(hosts.hosts)
    ]


def training_rank_pid(host: Host, rank: int) -> int:
    """The process of global rank `rank` on `host`: the launchers around it carry no RANK, and its
    forked data-loader workers (same command line and environment) are its children."""
    candidates: dict[int, int] = {}  # pid -> parent pid
    for pid in host.pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ and runs.PROBED_TRAIN.name.encode() in cmdline:
            candidates[pid] = parent
    top = [pid for pid, parent in candidates.items() if parent not in candidates]
    assert len(top) == 1, f"expected one process of rank {rank} in {host.name}, found {candidates}"
    return top[0]


def test_deepspeed_launcher_zero3_dead_host_then_resume_on_both(
        two_hosts: TwoHosts, fmnist_shards: runs.Shards, tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path / "logs"
    hostfile = launchers.write_hostfile(tmp_path / "hostfile", [(h.name, 1) for h in two_hosts.hosts])
    long_run = runs.train_overrides(fmnist_shards.train, out, max_steps=200, zero=3)

    launches = deepspeed_on_both_hosts(two_hosts, hostfile, long_run, logs, "killed")
    for rank in (0, 1):  # each rank writes its own record after the checkpoint, in any order
        runs.wait_for(out / "rank_probe" / "step_00000002" / f"rank_{rank}.json", launches, timeout_s=180)
    probes = runs.rank_probes(out, step=2)
    runs.assert_one_rank_per_host(probes, two_hosts)
    runs.assert_same_parameters(probes)
    assert {p["launcher"] for p in probes} == {"deepspeed"}

    os.kill(training_rank_pid(two_hosts.b, rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    for launch in launches:
        launch.wait(timeout_s=DEAD_PEER_BOUND_S + 15)  # the assertion below reports the real bound
    took = time.monotonic() - killed_at
    assert took < DEAD_PEER_BOUND_S, f"survivors took {took:.0f} s to stop\n" + launches[0].describe()
    assert all(launch.proc.returncode not in (0, 124, 137) for launch in launches), \
        "\n\n".join(launch.describe() for launch in launches)  # failed by itself, not by `timeout`
    print(f"host a's processes stopped {took:.1f} s after rank 1 was killed")
    # The survivor's error says what happened and where: the peer at host b's address went away.
    blamed = [line for line in launches[0].log_text().splitlines()
              if two_hosts.b.addr in line and any(reason in line for reason in _PEER_GONE)]
    assert blamed, launches[0].describe()
    last = runs.latest_checkpoint_step(out)
    assert last is not None and 2 <= last < 200

    resume = runs.train_overrides(fmnist_shards.train, out, max_steps=last + 2, zero=3)
    launches = deepspeed_on_both_hosts(two_hosts, hostfile, resume, logs, "resumed")
    runs.wait_ok(launches)
    assert f"at step {last}" in launches[0].log_text(), launches[0].describe()
    probes = runs.rank_probes(out, step=last + 2)
    runs.assert_one_rank_per_host(probes, two_hosts)
    runs.assert_same_parameters(probes)
    steps = runs.metric_steps(out)
    assert steps[-2:] == [last + 1, last + 2] and set(range(1, last + 3)) <= set(steps)
