"""Two test "hosts" on one machine: network namespaces joined by a veth pair.

Each namespace has its own network stack (its own `eth0`, address and port space), so ranks that run in
different namespaces can only reach each other over the veth link, exactly as ranks on two machines reach
each other over a NIC. Only the two namespace addresses and loopback are ever contacted; the namespaces
have no route anywhere else.

Cleanup is the point of this module: every process started here is wrapped in `timeout`, lives in one of
the namespaces, and is killed (with everything else still inside the namespace, e.g. Ray daemons that
detach themselves) before the namespaces are deleted, from a pytest finalizer, from `atexit`, and from a
SIGTERM/SIGHUP handler. Namespaces left behind by a run that was SIGKILLed are removed by the next run.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

NAMESPACE_PREFIX = "vitscale-"
SUBNET_PREFIX = "10.77.0."
IFNAME = "eth0"
# Never passed on from the test process: proxies (traffic outside the namespaces) and the rendezvous
# variables of any job the tests themselves run under (each launch sets its own).
_DROPPED_VARS = frozenset({
    "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RAY_ADDRESS",
})


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; with `check`, a failure raises one line naming the command and ip's own error."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done


def namespaces_unavailable() -> str | None:
    """Why this machine cannot create network namespaces (not root, no iproute2, no CAP_SYS_ADMIN), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run `make test-multinode` as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to create network namespaces"
    probe = f"{NAMESPACE_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as err:
        return f"cannot create network namespaces here: {err}"
    _ip("netns", "del", probe, check=False)
    return None


def list_namespaces() -> list[str]:
    """Names from `ip netns list` (each line is `NAME` or `NAME (id: N)`)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_namespace_processes(*names: str, grace_s: float = 3.0) -> None:
    """SIGTERM everything inside the namespaces, then SIGKILL what is still there after `grace_s`
    (one grace period for all of them: Ray's daemons, for one, take it in full)."""

    def alive() -> list[int]:
        return [pid for name in names for pid in namespace_pids(name)]

    pids = alive()
    if not pids:
        return
    _signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids = alive()
        if not pids:
            return
        time.sleep(0.1)
    while pids:  # a process can fork while we kill; loop until the namespaces are empty
        _signal_pids(pids, signal.SIGKILL)
        time.sleep(0.1)
        pids = alive()


def delete_namespace(name: str) -> None:
    kill_namespace_processes(name)
    _ip("netns", "del", name, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete `vitscale-<pid>-*` namespaces whose creating process is gone (a run killed with SIGKILL)."""
    removed = []
    for name in list_namespaces():
        match = re.fullmatch(rf"{re.escape(NAMESPACE_PREFIX)}(\d+)-.+", name)
        if match is None:
            continue
        owner = int(match.group(1))
        if owner != os.getpid() and Path(f"/proc/{owner}").exists():
            continue  # another live test session owns it
        delete_namespace(name)
        removed.append(name)
    return removed


@dataclass
class Launch:
    """One command started on a host; `proc` is the `timeout` wrapper around it."""

    host: "Host"
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    started: float

    def wait(self, timeout_s: float | None = None) -> int:
        return self.proc.wait(timeout=timeout_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self) -> str:
        """Exit status, command and log tail: what a failing assertion should show."""
        tail = "\n".join(self.log_text().splitlines()[-40:])
        return f"[{self.host.name} rc={self.proc.returncode}] {' '.join(self.argv)}\n--- {self.log} (tail) ---\n{tail}"


@dataclass
class Host:
    """A network namespace with one address on the veth link."""

    name: str
    addr: str
    launches: list[Launch] = field(default_factory=list)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment every rank on this host gets: gloo bound to the veth, no proxies."""
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARS}
        env.update(
            GLOO_SOCKET_IFNAME=IFNAME,
            NO_PROXY="*",
            PYTHONUNBUFFERED="1",
            # bin/ of the venv first, so launchers find the venv's python, torchrun, deepspeed, ray.
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        )
        env.update(extra or {})
        return env

    def launch(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Launch:
        """Start `argv` inside the namespace under `timeout` (SIGTERM at `timeout_s`, SIGKILL 10 s later)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        wrapped = ["ip", "netns", "exec", self.name, "timeout", "-k", "10", f"{timeout_s:g}", *argv]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                wrapped, stdout=out, stderr=subprocess.STDOUT, env=self.env(env), cwd=cwd,
                start_new_session=True,  # its own process group: killable as a whole
            )
        launch = Launch(self, list(argv), log, proc, time.monotonic())
        self.launches.append(launch)
        return launch

    def run(self, argv: Sequence[str], *, log: Path, timeout_s: float, **kw) -> Launch:
        """Launch and wait; the `timeout` wrapper guarantees the wait ends."""
        launch = self.launch(argv, log=log, timeout_s=timeout_s, **kw)
        launch.wait()
        return launch

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def kill_all(self) -> None:
        """Stop every process in the namespace (launched here or detached daemons they started)."""
        self.terminate_launches()
        kill_namespace_processes(self.name)
        self.reap_launches()

    def terminate_launches(self) -> None:
        """SIGTERM each launch's process group (the `timeout` wrapper and what it started)."""
        for launch in self.launches:
            if launch.proc.poll() is None:
                try:
                    os.killpg(launch.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def reap_launches(self) -> None:
        """Collect the exit status of every launch, so none lingers as a zombie of the test process."""
        for launch in self.launches:
            try:
                launch.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                launch.proc.kill()
                launch.proc.wait()


_LIVE: list["TwoHosts"] = []
_HANDLERS_INSTALLED = False


def _cleanup_all() -> None:
    for hosts in list(_LIVE):
        hosts.destroy()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_cleanup_handlers() -> None:
    """atexit + SIGTERM/SIGHUP (what CI sends on a timeout); SIGINT is pytest's KeyboardInterrupt."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    _HANDLERS_INSTALLED = True


class TwoHosts:
    """Host `a` (10.77.0.1, the master) and host `b` (10.77.0.2) joined by one veth pair."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.a = Host(f"{NAMESPACE_PREFIX}{tag}-a", f"{SUBNET_PREFIX}1")
        self.b = Host(f"{NAMESPACE_PREFIX}{tag}-b", f"{SUBNET_PREFIX}2")
        self._ports = itertools.count(29500)
        self.created = False

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def next_port(self) -> int:
        """A port never used before in this session, so no launch meets a TIME_WAIT socket of the last."""
        return next(self._ports)

    def create(self) -> "TwoHosts":
        _install_cleanup_handlers()
        remove_stale_namespaces()
        for host in self.hosts:
            if host.name in list_namespaces():
                delete_namespace(host.name)
        _LIVE.append(self)
        self.created = True
        _ip("netns", "add", self.a.name)
        _ip("netns", "add", self.b.name)
        _ip("link", "add", IFNAME, "netns", self.a.name, "type", "veth", "peer", "name", IFNAME,
            "netns", self.b.name)
        for host in self.hosts:
            _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", IFNAME)
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "link", "set", IFNAME, "up")
        return self

    def kill_all(self) -> None:
        """Like Host.kill_all for both hosts, with one shared grace period."""
        for host in self.hosts:
            host.terminate_launches()
        kill_namespace_processes(self.a.name, self.b.name)
        for host in self.hosts:
            host.reap_launches()

    def destroy(self) -> None:
        """Idempotent: kill everything in both namespaces, then delete them (the veth pair goes too)."""
        if self in _LIVE:
            _LIVE.remove(self)
        if not self.created:
            return
        self.kill_all()
        for host in self.hosts:
            delete_namespace(host.name)
        self.created = False

    def __enter__(self) -> "TwoHosts":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
