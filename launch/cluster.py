"""Start an embedded Ray or attach to a cluster, and check a trial fits before any trial starts.

Two facts of Ray shape this module (docs/sweeps.md):
- A Tune function trainable holds 1 CPU by default, so on a small machine it starves the Ray Train
  workers it launches. Trials therefore hold no CPU, only a `trial_slot` custom resource that the
  embedded Ray advertises (one slot per trial that fits) and a cluster may advertise with
  `ray start --resources='{"trial_slot": N}'`; without it `max_concurrent_trials` bounds concurrency.
- When ASHA stops a trial, Ray Train's placement-group cleaner asks the State API whether the dead
  controller is gone; without a dashboard it cannot, and the stopped trial's CPUs leak. The embedded
  Ray therefore runs its dashboard on a known port and tells every worker where the API server is.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

from launch.spec import ResourceSpec

log = logging.getLogger(__name__)
TRIAL_SLOT = "trial_slot"
HEAD_NODE = "node:__internal_head__"  # Ray's marker resource of the head node (1.0 there)


class ClusterResourceError(RuntimeError):
    """The cluster cannot host one trial's worker group: raised before any trial starts."""


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers to Ray Train workers."""

    cpus: float
    gpus: float


def local_capacity() -> NodeCapacity:
    """The machine an embedded Ray would use: the CPUs this process may run on and visible GPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a hard dependency of vitscale
        gpus = 0
    return NodeCapacity(cpus=float(cpus), gpus=float(gpus))


def workers_that_fit(nodes: list[NodeCapacity], res: ResourceSpec) -> int:
    """Ray Train workers the cluster can host at once: a worker cannot span nodes, so count per node."""
    total = 0
    for node in nodes:
        fit = math.floor(node.cpus / res.cpus_per_worker + 1e-9)
        if res.gpus_per_worker:
            fit = min(fit, math.floor(node.gpus / res.gpus_per_worker + 1e-9))
        total += max(fit, 0)
    return total


def check_trial_fits(nodes: list[NodeCapacity], res: ResourceSpec, where: str) -> int:
    """Return how many trials fit side by side, or raise one line saying what is missing."""
    fit = workers_that_fit(nodes, res)
    if fit >= res.num_workers:
        return fit // res.num_workers
    total_cpu = sum(n.cpus for n in nodes)
    total_gpu = sum(n.gpus for n in nodes)
    need = (f"{res.num_workers} workers x ({res.cpus_per_worker:g} CPU"
            + (f" + {res.gpus_per_worker:g} GPU" if res.gpus_per_worker else "") + ")")
    raise ClusterResourceError(
        f"sweep.resources: one trial needs {need} but {where} ({len(nodes)} node(s), {total_cpu:g} CPU, "
        f"{total_gpu:g} GPU) can host only {fit} such worker(s); lower sweep.resources.num_workers / "
        f"cpus_per_worker / gpus_per_worker or use a bigger cluster (--address)")


def cluster_nodes() -> list[NodeCapacity]:
    """Alive nodes of the connected cluster (ray.nodes(): per node, so a worker is never split)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [NodeCapacity(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in nodes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_dashboard_available() -> None:
    """The embedded Ray needs its dashboard (State API) or stopped trials leak their CPUs."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (Ray's own test for a dashboard install)
    except ImportError:
        raise ClusterResourceError(
            "the embedded Ray needs its dashboard (Ray Train frees an ASHA-stopped trial's placement group "
            "through the State API): pip install 'ray[default,tune,train]'") from None


def resolve_address(cli_address: str | None) -> str | None:
    """`--address` wins, then RAY_ADDRESS; None means start an embedded Ray on this machine."""
    address = cli_address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


def start_ray(address: str | None, res: ResourceSpec, max_concurrent: int | None,
              env_vars: dict[str, str]) -> tuple[int, bool]:
    """Init Ray; return (trials that may run at once, whether trials can use the trial_slot resource).

    Embedded: fail on resources *before* starting (cheap), then start with exactly the slots that fit.
    Attached: connect, then compare with what the cluster reports.
    """
    import ray

    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars)}
    if address is None:
        fit = check_trial_fits([local_capacity()], res, "this machine (embedded Ray)")
        slots = min(fit, max_concurrent) if max_concurrent else fit
        cap = local_capacity()
        port = _free_port()
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=int(cap.cpus), num_gpus=int(cap.gpus), resources={TRIAL_SLOT: slots},
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
        log.info("embedded Ray: %d CPU, %d GPU, %d trial slot(s), dashboard :%d", cap.cpus, cap.gpus, slots, port)
        return slots, True
    ctx = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    fit = check_trial_fits(cluster_nodes(), res, f"the cluster at {address}")
    slots = min(fit, max_concurrent) if max_concurrent else fit
    has_slots = ray.cluster_resources().get(TRIAL_SLOT, 0) >= 1
    dashboard = getattr(ctx, "dashboard_url", None)
    if dashboard and "RAY_API_SERVER_ADDRESS" not in runtime_env["env_vars"]:
        # The State API (placement-group cleanup of stopped trials) must find this cluster's
        # dashboard, not another Ray's on the same host: reconnect with its address in the job env.
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://{dashboard}"
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{dashboard}"
        ray.shutdown()
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    log.info("attached to Ray at %s: %s; %d trial(s) at once", address, ray.cluster_resources(), slots)
    return slots, has_slots
