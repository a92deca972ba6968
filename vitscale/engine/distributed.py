"""Process-group set-up and teardown for every way a run is started.

``deepspeed`` and ``torchrun`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*; Ray Train creates the
process group itself before our code runs; plain ``python vitscale/train.py`` gets a group of one so
the same DeepSpeed code path runs everywhere.

Teardown matters: a process that reaches interpreter exit while gloo's worker threads and the store's
socket threads are still owned by a live process group can abort in a C++ destructor with
``terminate called without an active exception`` after a run that succeeded. ``teardown`` therefore
synchronises the ranks, destroys the groups we created and only then lets the interpreter exit.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitscale.cpu_threads import apply_rank_threads, local_world_size, plan_cpu_threads

log = logging.getLogger(__name__)
_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=(\d+))?$")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and who owns the process group."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "deepspeed" | "torchrun" | "external" (e.g. Ray Train) | "single"
    device: torch.device
    backend: str
    owns_group: bool  # False when someone else (Ray Train) created it and will destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove the launcher's ``--local_rank=N`` / ``--local_rank N`` (Hydra rejects it).

    The value is exported as LOCAL_RANK when the environment does not already carry it.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        match = _LOCAL_RANK_ARG.match(argv[i])
        if match is None:
            out.append(argv[i])
            i += 1
            continue
        value = match.group(2)
        if value is None and i + 1 < len(argv) and argv[i + 1].isdigit():
            value = argv[i + 1]
            i += 1
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


def _detect_launcher() -> str:
    if dist.is_available() and dist.is_initialized():
        return "external"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed"
    return "single"


def local_address(peer: str | None = None) -> str:
    """This host's address on the route to ``peer`` (MASTER_ADDR): the interface the job really uses.

    A UDP connect sends nothing; it only asks the kernel for a route. gethostname() is no proof of
    placement (containers and network namespaces share or invent names), an address is.
    """
    peer = peer or os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 1))
            return str(s.getsockname()[0])
    except OSError:
        return "unknown"


def split_cpu_threads(local_world_size: int, loader_workers: int = 0) -> int | None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    torch starts one intra-op thread per core in every process; two ranks on two cores then run
    four compute threads plus their data workers, and time-slice (the demo's pre-training ran ~10 %
    slower that way). torchrun exports OMP_NUM_THREADS=1 for this reason; the deepspeed launcher
    does only with --bind_cores_to_rank. The rule, and why, is vitscale.cpu_threads'
    (``plan_cpu_threads``); the loader settles it again once its worker count is known.
    Returns the thread count set, or None when left alone.
    """
    if "OMP_NUM_THREADS" in os.environ or (local_world_size <= 1 and loader_workers <= 0):
        return None
    plan = plan_cpu_threads(local_world_size, loader_workers)
    apply_rank_threads(plan)
    return plan.torch_threads


_ROUND_KEY = "vitscale/round"


def elastic_round_store(rank: int, world_size: int, timeout: datetime.timedelta,
                        poll_s: float = 0.05, reread_s: float = 1.0) -> tuple[dist.Store, int]:
    """The agent's store under a prefix of this launch round's own, and the round's number.

    Under torchrun the workers' env:// store is the elastic agent's TCPStore
    (TORCHELASTIC_USE_AGENT_STORE=True), which outlives a restart, and torch hands it to the workers
    without a per-attempt prefix. A restarted round then finds the dead round's keys: the gloo (or
    NCCL) addresses of the default group and of every ``new_group`` are published under the same
    names in each round, and a rank that looks a peer up before that peer has written it again
    connects to the dead process (``Gloo connectFullMesh failed ... Connection refused``).
    TORCHELASTIC_RESTART_COUNT cannot name the round: each agent counts its own restarts and a
    restart for a membership change is not counted, so two nodes can disagree.

    Rank 0 takes a new number from a counter in the store (one per rank-0 process, never reused) and
    publishes it; every other rank answers under that number with a random nonce and uses it once
    rank 0 has acknowledged that nonce. A number a dead round published is never acknowledged (its
    rank 0 is gone), so a rank that read it reads again. Everything the process groups write then
    lives under ``vitscale/round/<n>/``, fresh in every round.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        number = store.add(f"{_ROUND_KEY}/counter", 1)
        store.set(f"{_ROUND_KEY}/current", str(number))
        for peer in range(1, world_size):  # blocks (store timeout) until the peer has said hello
            nonce = store.get(f"{_ROUND_KEY}/{number}/hello/{peer}").decode()
            store.set(f"{_ROUND_KEY}/{number}/ack/{nonce}", b"1")
    else:
        nonce = uuid.uuid4().hex
        while True:
            number = int(store.get(f"{_ROUND_KEY}/current"))  # blocks until a rank 0 has published one
            store.set(f"{_ROUND_KEY}/{number}/hello/{rank}", nonce)
            reread = time.monotonic() + reread_s
            while time.monotonic() < reread and not store.check([f"{_ROUND_KEY}/{number}/ack/{nonce}"]):
                time.sleep(poll_s)
            if store.check([f"{_ROUND_KEY}/{number}/ack/{nonce}"]):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: no rank 0 acknowledged this launch round within {timeout}")
    return dist.PrefixStore(f"{_ROUND_KEY}/{number}/", store), number


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group and pick this rank's device; NCCL on CUDA, gloo on CPU."""
    import deepspeed

    launcher = _detect_launcher()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if launcher == "single":
        # A group of one needs no rendezvous: an in-process HashStore instead of a TCPStore, so a
        # plain `python vitscale/train.py` opens no rendezvous port (TCPStore binds every interface).
        # gloo's transport still opens a socket per group; keep it on loopback, not on whatever the
        # host name resolves to.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        if not cuda and "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agent's store survives a restart with the dead round's keys in it: see elastic_round_store.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, number = elastic_round_store(rank, world, timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        log.log(logging.INFO if restart != "0" and rank == 0 else logging.DEBUG,
                "torchrun restart %s: process groups under the store prefix %s/%d/ of this round", restart,
                _ROUND_KEY, number)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)

    if launcher != "external":
        # Adopts a group that exists; without MASTER_* (a group of one) it would look for MPI first.
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=launcher != "single")
    else:
        backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1) if cuda else 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks' share now; the loader (vitscale.cpu_threads.cpu_loader_worker_init) settles it
        # with its worker count and logs the "CPU threads: ..." line.
        threads = split_cpu_threads(local_world_size())
        if threads is not None:
            log.debug("CPU: %d torch thread(s) per rank for %d local ranks", threads, local_world_size())
    info = DistInfo(rank, world, local_rank, launcher, device, backend, owns_group=launcher != "external")
    log.info("rank %d/%d local_rank %d on %s (%s) via %s, %s, collective timeout %.0f s", rank, world,
             local_rank, socket.gethostname(), local_address(), launcher, backend, timeout_s)
    return info


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Logical AND of ``flag`` over ranks (every rank gets the same answer)."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() == 0.0)


def teardown(info: DistInfo | None) -> None:
    """Synchronise, then destroy the process group we created, so no comm thread outlives main."""
    if info is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except Exception as err:  # a peer already died: still release our own resources
        log.warning("teardown barrier failed (%s); destroying the process group anyway", err)
    if info.owns_group:
        destroy_group()


def destroy_group() -> None:
    """Destroy the default group through DeepSpeed, which also drops the groups it cached (its world
    clone, data-parallel groups): a later Trainer in the same process (a notebook, a test, a reused
    Ray worker) would otherwise broadcast over a destroyed group ("Group ... is not registered")."""
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()
