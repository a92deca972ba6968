"""The step loop never waits on the host outside log steps, and its NaN guard still stops in time.

``tests/dist_scripts/sync_probe.py`` runs a real 2-rank (torchrun, gloo) ``Trainer.fit`` on
Fashion-MNIST shards with every host read-back patched: ``Tensor.item``, ``Tensor.__float__``,
``Tensor.tolist`` and ``torch.cuda.synchronize``. Calls made from ``vitscale/`` code are recorded with
the step they belong to; only log steps may read back. DeepSpeed's own reads are printed: they are
what docs/training.md lists as DeepSpeed's per-step reads.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dist_scripts.fmnist_shards import write_shards
from tiny_runs import TINY_VIT_RUN  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VITSCALE = str(REPO / "vitscale")
STEPS, LOG_EVERY = 8, 4
COMMON = [
    *TINY_VIT_RUN, "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
    "data.val_shards=null", "data.num_workers=1", "trainer.global_batch_size=32", "trainer.micro_batch_size=8",
    f"trainer.log_every={LOG_EVERY}", f"trainer.nan_patience={LOG_EVERY}", "trainer.checkpoint_every=0",
    "trainer.export_at_end=false", "trainer.precision=fp32", "trainer.peak_flops=1", "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> str:
    train, _ = write_shards(tmp_path_factory.mktemp("fmnist_sync"), n_train=256, n_val=32, per_shard=32,
                            src=fashion_mnist)
    return train


@pytest.mark.parametrize("stage", [0, 2])
def test_no_host_sync_outside_log_steps(shards: str, tmp_path: Path, stage: int) -> None:
    """2 ranks, gradient accumulation 2: vitscale code reads nothing back between log steps."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "dist_scripts" / "sync_probe.py"), str(out), *COMMON,
           f"data.train_shards='{shards}'", f"trainer.max_steps={STEPS}", f"deepspeed=zero{stage}",
           "optim=adam_pretrain"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log_steps = set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for rank in (0, 1):
        probe = json.loads((out / f"host_reads_rank{rank}.json").read_text())
        assert probe["step"] == STEPS
        calls = [tuple(c) for c in probe["calls"] if c[1] in ("step", "between")]
        ours = [c for c in calls if c[3].startswith(VITSCALE)]
        theirs = Counter((c[0], c[3].split("site-packages/")[-1]) for c in calls
                         if c[1] == "step" and not c[3].startswith(VITSCALE))
        print(f"ZeRO-{stage} rank {rank}: DeepSpeed/torch read-backs in {STEPS} steps: {dict(theirs)}")
        off_log = [c for c in ours if c[1] == "step" or c[2] not in log_steps]
        assert not off_log, f"rank {rank}: host reads outside log steps: {off_log}"
        assert {c[2] for c in ours} == log_steps  # the instrumentation does see the log steps' reads


def test_nan_guard_stops_within_patience_without_per_step_reads(shards: str, tmp_path: Path) -> None:
    """lr 1e30: every step after the first is non-finite; the guard (read every nan_patience steps)
    stops the run at the first read-back after nan_patience bad steps, with a checkpoint, exit 2."""
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "vitscale" / "train.py"), *COMMON,
                           f"data.train_shards='{shards}'", f"output_dir={out}", "deepspeed=zero0",
                           "optim=adam_pretrain", "optim.lr=1e30", "optim.schedule.name=constant",
                           "trainer.max_steps=40", "trainer.global_batch_size=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "non-finite steps in a row (trainer.nan_patience=4)" in text and "Traceback" not in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] <= 1 + 2 * LOG_EVERY and last["nan_skips"] >= LOG_EVERY
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{last['step']:08d}"
