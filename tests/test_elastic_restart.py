"""`torchrun --max-restarts` restarts a job after a rank died, and resume=auto continues it (issue 14).

Rank 1 of a 2-rank ZeRO-2 run is SIGKILLed after step 5 of 8; torchrun's agent stops rank 0 and starts
a new round, which resumes from the newest intact checkpoint and finishes at step 8 with the losses
of an uninterrupted run. Before vitscale.engine.distributed.elastic_round_store, the new round read
the dead round's gloo addresses from the agent's store and failed with
``Gloo connectFullMesh failed ... Connection refused`` (docs/training.md "Elastic launch").
"""
from __future__ import annotations

import datetime
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from test_elastic import REPO, run
from test_train_dist import _kill_rank_1_when, losses, shards  # noqa: F401 - fixture

TRAIN = REPO / "vitscale" / "train.py"


def test_round_store_ignores_what_a_dead_round_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: the agent's store with round 1's keys in it; in round 2 rank 1 arrives first, reads
    round 1's number, gets no acknowledgement, reads again and ends in round 2 with rank 0."""
    from vitscale.engine.distributed import elastic_round_store

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the agent's
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    timeout = datetime.timedelta(seconds=30)

    def one_round(rank0_delay_s: float) -> dict[int, tuple]:
        got: dict[int, tuple] = {}

        def rank(r: int) -> None:
            if r == 0:
                time.sleep(rank0_delay_s)
            got[r] = elastic_round_store(r, 2, timeout, reread_s=0.2)

        threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return got

    first = one_round(0.0)
    assert first[0][1] == first[1][1] == 1
    first[1][0].set("gloo/address/1", "of a process that is now dead")
    second = one_round(1.0)  # rank 1 reads round 1's number first
    assert second[0][1] == second[1][1] == 2
    assert not second[0][0].check(["gloo/address/1"])  # the dead round's key is not visible
    assert first[0][0].get("gloo/address/1") == b"of a process that is now dead"


def _round_workers(proc, restart: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("TORCHELASTIC_RESTART_COUNT") == str(restart) and "train.py" in " ".join(
                    child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_rank_is_killed(shards: list[str], tmp_path: Path) -> None:
    overrides = [shards[0], "deepspeed=zero2", "trainer.max_steps=8", "model.dropout=0.1"]
    straight = run(2, tmp_path / "straight", overrides, script=TRAIN)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]

    out = tmp_path / "restarted"
    out.mkdir()
    proc = run(2, out, overrides, script=TRAIN, extra_launcher=["--max-restarts", "1"], wait=False)
    try:
        killed_after = _kill_rank_1_when(out, proc, min_step=5)
        # What the restarted round finds: round 0's workers are all gone before the agent starts it.
        deadline = time.monotonic() + 60
        while _round_workers(proc, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert proc.wait(timeout=240) == 0, (tmp_path / "restarted.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "restarted.log").read_text()
    assert "Connection refused" not in text, text[-4000:]
    assert 5 <= killed_after < 8
    # One restart, and the new round resumed from the checkpoint `latest` named when it started.
    assert text.count("rank 0/2 local_rank 0") == 2, text[-4000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", text)
    assert len(resumed) == 1, resumed
    path, step = resumed[0]
    assert Path(path) == out / "checkpoints" / latest and int(step) == int(latest.split("_")[-1])
    assert int(step) in (3, 6) and int(step) <= killed_after
    # It finished at step 8 and every step, recomputed or not, has the uninterrupted run's loss.
    curve, reference = losses(out), losses(tmp_path / "straight")
    assert sorted(curve) == sorted(reference) == list(range(1, 9))
    for s in reference:
        assert abs(curve[s] - reference[s]) <= 1e-5, f"step {s}: {curve[s]} vs {reference[s]}"
