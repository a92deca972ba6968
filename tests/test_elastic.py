"""Resuming on a different world size (issue 14 part 2), and torchrun restarting a job after a rank died.

ZeRO 1, 2 and 3 each run a chain 2 ranks (steps 1-3) -> 1 rank (4-6) -> 2 ranks (7-9) in one
output_dir, through tests/dist_scripts/elastic_probe.py (train.py plus a dump of every parameter's
fp32 master copy and Adam moments, gathered after a resume and before each save). After each change
of world size the loaded state equals the saved one bit for bit, the step and the LR schedule
continue, the loss keeps going down, and the universal conversion is cached in <tag>/universal.
The in-process tests pin the data stream's remap (docs/data.md "Resuming on another world size").
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_stream import loader, take
from test_train_dist import _env, _port, shards  # noqa: F401 - fixture
from tiny_runs import TINY_VIT_RUN

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROBE = REPO / "tests" / "dist_scripts" / "elastic_probe.py"
LR, WARMUP = 5e-3, 1
# (world size, max_steps) of each leg; every leg checkpoints every 3 steps, so leg k ends at 3k.
CHAIN = [(2, 3), (1, 6), (2, 9)]
COMMON = [
    *TINY_VIT_RUN, "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
    "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.log_every=1",
    "trainer.checkpoint_every=3", f"optim.lr={LR}", f"optim.schedule.warmup_steps={WARMUP}",
    "tracking.enabled=false", "data.num_workers=1", "trainer.precision=fp32", "trainer.export_at_end=false",
    "eval.every=0", "data.val_shards=null", "trainer.keep_checkpoints=0",
]


def run(nproc: int, out: Path, overrides: list[str], *, script: Path = PROBE, extra_launcher: list[str] = (),
        timeout: float = 300, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port()),
               *extra_launcher, str(script), f"output_dir={out}", *COMMON, *overrides]
    env = {**_env(), "ELASTIC_PROBE_DIR": str(out / "probe")}
    if not wait:
        log = (out.parent / f"{out.name}.log").open("w")
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with (out.parent / f"{out.name}.log").open("a") as fh:
        fh.write(proc.stdout + proc.stderr)
    return proc


def expected_lr(step: int, total: int) -> float:
    """The LR DeepSpeed's WarmupDecayLR applies at 1-based ``step`` (LR 0 at the first two steps)."""
    it, warmup = step - 2, max(2, WARMUP)  # DeepSpeed's WarmupLR raises warmup_num_steps to at least 2
    if it < 0:
        return 0.0
    if it < warmup:
        return LR * it / warmup
    return LR * max(0.0, (total - it) / (total - warmup))


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory, shards: list[str]) -> dict[int, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("elastic")
    out: dict[int, tuple[Path, list[str]]] = {}
    for stage in (1, 2, 3):
        folder, logs = root / f"zero{stage}", []
        for world, max_steps in CHAIN:
            proc = run(world, folder, [shards[0], f"deepspeed=zero{stage}", f"trainer.max_steps={max_steps}"])
            text = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"zero{stage} on {world} ranks to step {max_steps}:\n{text[-4000:]}"
            logs.append(text)
        out[stage] = (folder, logs)
    return out


def _state(folder: Path, kind: str, step: int) -> dict:
    return torch.load(folder / "probe" / f"{kind}_{step}.pt", weights_only=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_world_size_change_keeps_weights_and_optimizer_states_exactly(chains: dict, stage: int) -> None:
    folder, logs = chains[stage]
    for leg, (step, world, written_by, total) in enumerate([(3, 1, 2, 6), (6, 2, 1, 9)], start=1):
        saved, loaded = _state(folder, "saved", step), _state(folder, "loaded", step)
        assert loaded["step"] == saved["step"] == step
        assert saved.keys() == loaded.keys() and any(k.startswith("exp_avg_sq/") for k in saved)
        for key in saved:
            if key not in ("step", "lr"):
                assert torch.equal(saved[key], loaded[key]), f"zero{stage} leg {leg}: {key} changed"
        # The schedule continues from the step, over the new max_steps (one of the keys that may change).
        assert loaded["lr"] == pytest.approx(expected_lr(step + 1, total), rel=1e-9)
        text = logs[leg]
        assert (f"world size changed: {folder / 'checkpoints' / f'step_{step:08d}'} was written by {written_by} "
                f"ranks, this job has {world}") in text
        assert "converted it with DeepSpeed's ds_to_universal" in text
        assert "data stream: checkpoint written with world_size=" in text
        universal = folder / "checkpoints" / f"step_{step:08d}" / "universal"
        assert (universal / "manifest.json").is_file() and (universal / "zero").is_dir()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_steps_lr_and_loss_continue_across_the_chain(chains: dict, stage: int) -> None:
    folder, _ = chains[stage]
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 10))  # no step repeated or skipped
    for r in train:
        total = next(m for _, m in CHAIN if r["step"] <= m)
        assert r["lr"] == pytest.approx(expected_lr(r["step"], total), rel=1e-9, abs=1e-12), r
    curve = {r["step"]: r["loss"] for r in train}
    # Steps 1-2 apply LR 0, so step 3's loss (measured before its update) still equals step 1's.
    assert curve[9] < curve[6] < curve[4] < curve[1], curve


def test_second_resume_reuses_the_cached_conversion(chains: dict, tmp_path: Path, shards: list[str]) -> None:
    """A copy of the ZeRO-2 chain's step-3 checkpoint (2 ranks) with its cached universal/ resumes on
    1 rank again without converting; a resume at the world size that wrote a checkpoint converts nothing."""
    import shutil

    folder, _ = chains[2]
    out = tmp_path / "again"
    shutil.copytree(folder / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    (out / "checkpoints" / "latest").write_text("step_00000003")
    proc = run(1, out, [shards[0], "deepspeed=zero2", "trainer.max_steps=4"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "reused the universal checkpoint cached in" in text and "converted it" not in text
    assert torch.equal(_state(out, "loaded", 3)["param/pos_embed"], _state(folder, "loaded", 3)["param/pos_embed"])


def test_resume_auto_refuses_a_changed_config(chains: dict, shards: list[str]) -> None:
    folder, _ = chains[2]
    proc = run(1, folder, [shards[0], "deepspeed=zero2", "trainer.max_steps=12", "optim.lr=0.1",
                           "model.depth=3"])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [x for x in text.splitlines() if "was written by a run whose config differs" in x]
    assert lines, text[-3000:]
    assert "model.depth (2 -> 3)" in lines[0] and "optim.lr (0.005 -> 0.1)" in lines[0]
    assert "resume=null" in lines[0] and "new output_dir" in lines[0]
    assert "trainer.max_steps" not in lines[0]  # may change on resume


# ------------------------------------------------------------------------------ data stream remap
def test_stream_remap_never_replays_and_is_exact_afterwards(shards: list[str]) -> None:
    pattern = shards[0].split("=", 1)[1].strip("'")
    cfg = {"train_shards": pattern, "num_classes": 10, "num_workers": 0, "shuffle_buffer": 4, "mean": [0.5],
           "std": [0.25], "augment": {"scale": [0.3, 1.0], "ratio": [0.75, 1.33]}, "max_bad_shards": 0}
    old = [loader(cfg, rank=r, world_size=2, in_chans=1) for r in range(2)]
    seen = [x for r in range(2) for b in take(old[r], 5) for x in b["key"]]
    merged: dict = {}
    for r in range(2):
        state = old[r].state_dict()
        merged = {**state, "ranks": {**merged.get("ranks", {}), **state["ranks"]}}
    furthest = max(d for s in merged["ranks"].values() for d, _ in s["positions"])

    remapped = loader(cfg, rank=0, world_size=1, in_chans=1)
    with pytest.raises(ValueError, match="world_size=2 in the checkpoint"):
        remapped.load_state_dict(merged)  # without elastic=True: refused as before
    remapped.load_state_dict(merged, elastic=True)
    assert remapped.positions == {0: (furthest + 1, 0)}
    again = loader(cfg, rank=0, world_size=1, in_chans=1)
    again.load_state_dict(merged, elastic=True)
    first = take(remapped, 3)
    assert [b["key"] for b in first] == [b["key"] for b in take(again, 3)]  # deterministic
    # Rank 0 worker 0 existed before: its new draws are past every draw it had begun.
    replay = take(loader(cfg, rank=0, world_size=1, in_chans=1), 5)
    assert [b["key"] for b in first] != [b["key"] for b in replay[:3]]

    state = remapped.state_dict()  # the next checkpoint: exact positions on the new world size
    exact = loader(cfg, rank=0, world_size=1, in_chans=1)
    exact.load_state_dict(state, elastic=True)
    assert [b["key"] for b in take(exact, 3)] == [b["key"] for b in take(remapped, 3)]
    assert seen  # the old streams did produce batches
