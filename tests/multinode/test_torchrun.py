"""`torchrun --nnodes 2 --node_rank N`: ZeRO-2 across two hosts, and checkpoints moving between layouts.

One chain of three runs on the same output_dir (resume=auto), world size 2 throughout:
two hosts (steps 1-4) -> one host with both ranks (5-6) -> two hosts again (7-8).
So the multi-host checkpoint resumes on a single host, and the single-host one on two hosts.
"""
from __future__ import annotations

from pathlib import Path

import runs
from twohosts import TwoHosts


def test_torchrun_two_hosts_zero2_and_resume_across_layouts(
        two_hosts: TwoHosts, fmnist_shards: runs.Shards, tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path / "logs"

    runs.wait_ok(runs.torchrun_two_hosts(
        two_hosts, runs.train_overrides(fmnist_shards.train, out, max_steps=4), logs, "two-hosts"))
    probes = runs.rank_probes(out, step=4)
    runs.assert_one_rank_per_host(probes, two_hosts)
    runs.assert_same_parameters(probes)
    assert {p["launcher"] for p in probes} == {"torchrun"}
    assert runs.metric_steps(out) == [1, 2, 3, 4]

    single = runs.torchrun_one_host(two_hosts.a, runs.train_overrides(fmnist_shards.train, out, max_steps=6),
                                    logs, "one-host", port=two_hosts.next_port())
    runs.wait_ok([single])
    assert "resumed from" in single.log_text() and "at step 4" in single.log_text(), single.describe()
    probes = runs.rank_probes(out, step=6)
    runs.assert_all_ranks_on(probes, two_hosts.a)
    runs.assert_same_parameters(probes)
    assert runs.metric_steps(out) == [1, 2, 3, 4, 5, 6]

    launches = runs.torchrun_two_hosts(
        two_hosts, runs.train_overrides(fmnist_shards.train, out, max_steps=8), logs, "two-hosts-again")
    runs.wait_ok(launches)
    assert "at step 6" in launches[0].log_text(), launches[0].describe()
    probes = runs.rank_probes(out, step=8)
    runs.assert_one_rank_per_host(probes, two_hosts)
    runs.assert_same_parameters(probes)
    assert runs.metric_steps(out) == list(range(1, 9))
    assert runs.latest_checkpoint_step(out) == 8
