"""How a CPU host's cores are split between training ranks and data-loader workers, decided once.

Why the framework decides it: torch starts one intra-op thread per core in every process, so on a
CPU host N ranks each take all the cores, their loader workers come on top, and everything
time-slices (the demo's pre-training ran ~10 % slower that way). Users should not have to know
OMP_NUM_THREADS, the launcher's defaults or DataLoader internals to get a sane split.

The rule (`plan_cpu_threads`):
  * each loader worker runs 1 torch thread (torch's DataLoader already calls set_num_threads(1) in
    its workers; `loader_worker_init` also caps the other libraries a decoder may pull in, and keeps
    inter-op threads at 1), because a worker decodes one sample at a time and gains nothing from
    a thread pool except contention;
  * when the host can give every worker a core of its own and still leave each rank at least 2
    threads, it does (T = (cores - all workers) // ranks): a starved loader stalls every rank at
    the next collective, and a rank's 3rd or 4th intra-op thread is worth less than a worker's core;
  * otherwise (small hosts, e.g. the 2-core demo) ranks take cores // ranks each and the workers
    time-slice with them: a worker is idle most of the time once its prefetch queue is full, and
    reserving a whole core for it would halve a rank's matmul threads to keep that core mostly
    idle. `data_wait_s` in metrics.jsonl says when this is wrong for a data set (an expensive decoder);
  * OMP_NUM_THREADS, when set, wins for the ranks: the user (or torchrun, which exports 1) chose.
  * workers that time-slice with ranks run at the lowest priority (nice 19): then they mostly run
    when a rank is idle, waiting for its peer at a collective, instead of preempting a rank in the
    middle of its step and making every other rank wait for it at the next collective. They cannot
    starve: once a worker's queue is empty its rank blocks on it, leaving the core to it. Measured
    on the 2-core bench (2 ranks, bench_e2e's ViT): +4.5 % img/s, data wait 2.4 % -> 1.2 % of a step;
    nice 10 gained nothing (a nice-10 process still takes ~10 % of a contended core);
Workers are not pinned to cores: on shared or small hosts pinning turns a busy neighbour into a
stall, and the kernel's scheduler already keeps a lone worker on one core.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Environment variables read by the thread pools a decoder may use (OpenMP, MKL, OpenBLAS, numexpr).
_POOL_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
SHARED_WORKER_NICE = 19  # workers that share cores with ranks: run when a rank waits (module docstring)


@dataclass(frozen=True)
class CpuThreadPlan:
    """The split for one host: every local rank gets ``torch_threads``, every loader worker 1."""

    cores: int
    local_ranks: int
    torch_threads: int
    loader_workers: int  # per rank
    user_set: bool = False  # torch_threads came from OMP_NUM_THREADS, not from the rule

    @property
    def worker_nice(self) -> int:
        """Niceness for the loader workers: the lowest priority when they share cores with ranks."""
        busy = self.local_ranks * (self.torch_threads + self.loader_workers)
        return SHARED_WORKER_NICE if self.loader_workers and busy > self.cores else 0

    def line(self) -> str:
        """The one log line a run prints at start (also what tests and benchmarks grep for)."""
        source = " (OMP_NUM_THREADS)" if self.user_set else ""
        nice = f" at nice {self.worker_nice} (they share cores with the ranks)" if self.worker_nice else ""
        return (f"CPU threads: {self.cores} cores, {self.local_ranks} local ranks x {self.torch_threads} torch "
                f"threads{source}, {self.loader_workers} loader workers x 1 thread{nice}")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Ranks on this host, as the launchers export it (torchrun: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))))


def plan_cpu_threads(local_ranks: int, loader_workers: int, cores: int | None = None,
                     env: dict[str, str] | None = None) -> CpuThreadPlan:
    """The split described in the module docstring; pure (no side effects) so it can be tested."""
    cores = available_cores() if cores is None else max(1, cores)
    local_ranks, loader_workers = max(1, local_ranks), max(0, loader_workers)
    env = os.environ if env is None else env
    user = env.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return CpuThreadPlan(cores, local_ranks, int(user), loader_workers, user_set=True)
    reserved = (cores - local_ranks * loader_workers) // local_ranks  # workers on cores of their own
    threads = reserved if reserved >= 2 else cores // local_ranks
    return CpuThreadPlan(cores, local_ranks, max(1, threads), loader_workers)


def apply_rank_threads(plan: CpuThreadPlan) -> None:
    """Set this rank's intra-op threads (a no-op when OMP_NUM_THREADS chose: torch already read it)."""
    if not plan.user_set and torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)


def loader_worker_init(worker_id: int, nice: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one thread per worker for torch and for decoders' own pools,
    at niceness ``nice`` (`CpuThreadPlan.worker_nice`).

    torch's worker loop already sets 1 intra-op thread; the environment caps cover libraries that a
    decoder imports lazily inside the worker (their pools read these at first use).
    """
    del worker_id
    torch.set_num_threads(1)
    for var in _POOL_VARS:
        os.environ[var] = "1"
    if nice > 0:
        os.nice(nice)  # raising niceness needs no privilege; the worker exits with its loader


_inits: dict[tuple[int, int, int, int], Callable[[int], None]] = {}


def cpu_loader_worker_init(num_workers: int, device: torch.device | None = None) -> Callable[[int], None] | None:
    """Call where the training DataLoader is built: settles this rank's torch threads now that the
    worker count is known, logs the split once per process, and returns the ``worker_init_fn``.

    On CUDA the host threads feed GPUs, not matmuls: only the workers are capped.
    """
    on_cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    init: Callable[[int], None] = loader_worker_init
    if on_cpu:
        plan = plan_cpu_threads(local_world_size(), num_workers)
        apply_rank_threads(plan)
        key = (plan.cores, plan.local_ranks, plan.torch_threads, plan.loader_workers)
        if key not in _inits:
            _inits[key] = functools.partial(loader_worker_init, nice=plan.worker_nice)
            log.info("%s", plan.line())
        init = _inits[key]
    return init if num_workers > 0 else None
