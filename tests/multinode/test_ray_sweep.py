"""A Ray cluster across two hosts (head on a, worker on b) running a `launch/sweep.py` trial.

Each host offers one CPU and the trial asks for 2 workers x 1 CPU, so its Ray Train workers can only
land one per host. Ray prefixes every line a worker prints with that worker's node address, which is how
the test sees where each rank ran; the trial's ZeRO-2 checkpoint shows the ranks held the same weights.
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import launchers
import runs
from twohosts import TwoHosts

RAY_PORT = 6390
# Ray prefixes each line a worker prints with "(RayTrainWorker pid=N, ip=ADDR)", leaving out ", ip=..."
# for workers on the driver's own node.
_WORKER_LINE = re.compile(r"\(RayTrainWorker pid=(\d+)(?:, ip=([\d.]+))?\)")


@pytest.fixture
def ray_temp_dirs(two_hosts: TwoHosts) -> Iterator[list[Path]]:
    """One per node, short: Ray puts unix sockets under them (108-byte limit). Named after the
    session's pid like the namespaces, so those of a killed session are recognised and removed."""
    for stale in Path("/tmp").glob("vsr-*-*"):
        owner = stale.name.split("-")[1]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    dirs = [Path(f"/tmp/vsr-{host.name.removeprefix('vitscale-')}") for host in two_hosts.hosts]
    yield dirs
    two_hosts.kill_all()  # Ray's processes hold files open in these directories
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def sweep_overrides(shards: runs.Shards, work: Path) -> list[str]:
    """One trial of the demo sweep, shrunk: 2 workers x 1 CPU, 4 steps, report + checkpoint at 2 and 4."""
    return [
        "+sweep=demo",
        "trainer.precision=fp32",  # rank 0 module == merged fp32 partitions, bit for bit
        f"data.train_shards='{shards.train}'",
        f"data.val_shards='{shards.val}'",
        f"output_dir={work / 'out'}",
        "sweep.num_samples=1",
        "sweep.scheduler.type=fifo",
        "sweep.scheduler.grace_period=2",
        "sweep.resources.num_workers=2",
        "sweep.resources.cpus_per_worker=1",
        f"sweep.storage_path={work / 'sweeps'}",
        "tracking.enabled=false",
        "deepspeed=zero2",
        "trainer.max_steps=4",
        "trainer.checkpoint_every=2",
        "trainer.log_every=1",
        "trainer.global_batch_size=32",
        "trainer.micro_batch_size=16",
        "trainer.export_at_end=false",
        "eval.every=2",
        "eval.batch_size=250",
        "optim.schedule.warmup_steps=1",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "data.shuffle_buffer=100",
    ]


def zero2_ranks_agree(tag_dir: Path) -> None:
    """Rank 0's full module weights equal the fp32 partitions each rank saved, merged by DeepSpeed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    merged = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")["module"]
    assert sorted(merged) == sorted(module)
    for name, value in merged.items():
        torch.testing.assert_close(module[name].float(), value, rtol=0, atol=0, msg=name)


def test_ray_sweep_trial_with_workers_on_both_hosts(
        two_hosts: TwoHosts, ray_temp_dirs: list[Path], fmnist_shards: runs.Shards, tmp_path: Path) -> None:
    a, b = two_hosts.hosts
    logs = tmp_path / "logs"
    head_addr = f"{a.addr}:{RAY_PORT}"
    # No token auth (nothing to distribute between the hosts) and an explicit cluster address: Ray
    # would otherwise look for clusters in the process list, which the namespaces share.
    ray_env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": head_addr}
    head = a.launch(launchers.ray_head(addr=a.addr, port=RAY_PORT, num_cpus=1, temp_dir=ray_temp_dirs[0]),
                    log=logs / "ray-head.log", timeout_s=400, env=ray_env)
    worker = b.launch(launchers.ray_worker(head=head_addr, addr=b.addr, num_cpus=1, temp_dir=ray_temp_dirs[1]),
                      log=logs / "ray-worker.log", timeout_s=400, env=ray_env)
    for node in (head, worker):  # the worker must have joined, or the sweep sees a 1-CPU cluster
        runs.wait_for_text(node, "Ray runtime started", [head, worker], timeout_s=120)
    driver = a.run(["python", str(runs.REPO / "launch" / "sweep.py"), *sweep_overrides(fmnist_shards, tmp_path)],
                   log=logs / "sweep.log", timeout_s=300, env=ray_env, cwd=tmp_path)
    assert driver.proc.returncode == 0, "\n\n".join(x.describe() for x in (driver, head, worker))

    worker_hosts = {pid: ip or a.addr for pid, ip in _WORKER_LINE.findall(driver.log_text())}
    assert sorted(worker_hosts.values()) == [a.addr, b.addr], driver.describe()  # 2 ranks, one per host

    trial_dirs = list((tmp_path / "sweeps").glob("*/trials/*"))
    assert len(trial_dirs) == 1, trial_dirs
    assert runs.metric_steps(trial_dirs[0]) == [1, 2, 3, 4]
    # The checkpoint Ray assembled from what each host's rank reported at the last step.
    reported = sorted((tmp_path / "sweeps").glob("*/ray_train/*/checkpoint_*/step_00000004"))
    assert len(reported) == 1, reported
    zero2_ranks_agree(reported[0])
