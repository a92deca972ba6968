"""The harness itself: hosts can only talk over the veth, gloo crosses it, and cleanup leaves nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import launchers
from twohosts import TwoHosts, list_namespaces, remove_stale_namespaces

PROBE = Path(__file__).with_name("gloo_probe.py")


_LISTEN_ONCE = (
    "import socket,sys; s=socket.create_server((sys.argv[1], int(sys.argv[2]))); "
    "c, peer = s.accept(); print('peer', peer[0], flush=True)"
)
_CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()"


def test_hosts_reach_each_other_only_over_the_veth(two_hosts: TwoHosts, tmp_path: Path) -> None:
    a, b = two_hosts.hosts
    port = two_hosts.next_port()
    server = b.launch([sys.executable, "-c", _LISTEN_ONCE, b.addr, str(port)], log=tmp_path / "b.log",
                      timeout_s=30)
    for _ in range(100):  # until the listener is up; the client then connects exactly once
        client = a.run([sys.executable, "-c", _CONNECT, b.addr, str(port)], log=tmp_path / "a.log",
                       timeout_s=15)
        if client.proc.returncode == 0:
            break
        time.sleep(0.1)
    assert server.wait() == 0, server.describe()
    assert f"peer {a.addr}" in server.log_text()
    for host in two_hosts.hosts:  # the veth subnet is the only destination besides loopback
        routes = subprocess.run(["ip", "-n", host.name, "-4", "route"], capture_output=True, text=True,
                                check=True).stdout.splitlines()
        assert [r.split()[0] for r in routes] == ["10.77.0.0/24"], f"{host.name} routes: {routes}"


def test_gloo_ranks_on_both_hosts_agree(two_hosts: TwoHosts, tmp_path: Path) -> None:
    a, b = two_hosts.hosts
    port = two_hosts.next_port()
    launches = [
        host.launch(
            [*launchers.torchrun(PROBE, ["--out", str(tmp_path / "ranks")], nnodes=2, node_rank=i,
                                 nproc_per_node=1, master_addr=a.addr, master_port=port)],
            log=tmp_path / f"node{i}.log", timeout_s=120)
        for i, host in enumerate((a, b))
    ]
    codes = [launch.wait() for launch in launches]
    assert codes == [0, 0], "\n".join(launch.describe() for launch in launches)
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["addr"] for r in ranks} == {a.addr, b.addr}
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


def test_destroy_kills_detached_processes_and_removes_namespaces(tmp_path: Path) -> None:
    hosts = TwoHosts(tag=f"{os.getpid()}-selftest").create()
    # A process that leaves its launcher's process group, like a Ray daemon does.
    hosts.b.launch(["setsid", "sleep", "300"], log=tmp_path / "sleep.log", timeout_s=300)
    deadline = time.monotonic() + 10
    while not hosts.b.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = hosts.b.pids()
    assert orphans
    hosts.destroy()
    assert hosts.a.name not in list_namespaces() and hosts.b.name not in list_namespaces()
    for pid in orphans:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_stale_namespaces_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    """A pytest killed with SIGKILL cannot clean up; the next session's fixture start does."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no live process
    stale = TwoHosts(tag=f"{dead.pid}-0").create()
    stale.created = False  # forget it here, as a killed run would
    assert stale.a.name in list_namespaces()
    removed = remove_stale_namespaces()
    assert {stale.a.name, stale.b.name} <= set(removed)
    assert stale.a.name not in list_namespaces()


_SESSION_KILLED_BY_CI = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from twohosts import TwoHosts
hosts = TwoHosts(tag=sys.argv[2]).create()
hosts.b.launch(["sleep", "300"], log=Path(sys.argv[3]), timeout_s=300)
print("ready", flush=True)
time.sleep(300)
"""


def test_sigterm_to_the_session_removes_its_hosts(tmp_path: Path) -> None:
    """CI stops a job that ran over its limit with SIGTERM: the handler must still clean up."""
    tag = f"{os.getpid()}-sigterm"
    session = subprocess.Popen(
        [sys.executable, "-c", _SESSION_KILLED_BY_CI, str(Path(__file__).parent), tag, str(tmp_path / "s.log")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert session.stdout is not None and session.stdout.readline().strip() == "ready"
        assert f"vitscale-{tag}-b" in list_namespaces()
        session.terminate()
        session.wait(timeout=30)
    finally:
        if session.poll() is None:
            session.kill()
    assert f"vitscale-{tag}-a" not in list_namespaces()
    assert f"vitscale-{tag}-b" not in list_namespaces()
