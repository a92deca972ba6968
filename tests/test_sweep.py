"""End to end: a real sweep of the vitscale Trainer on Ray Tune + Ray Train (2 CPU workers per trial,
gloo), on real Fashion-MNIST shards, tracked in a throw-away MLflow sqlite store.

One sweep (~3-4 min on 2 cores) serves every check, because each trial costs ~30-40 s of Ray worker
and DeepSpeed start-up:
- 3 trials x 2 workers finish; ASHA stops the two hopeless learning rates early;
- rank 1 of the first trial is killed mid-run (VITSCALE_SWEEP_FAULT) and the trial resumes from its
  last reported checkpoint (not from scratch) and still finishes;
- MLflow holds the parent run, one child per trial (closed, tagged, with the trial's params), the
  results table and figure on the parent, and the best trial's model under NAME@sweep-best, which
  loads back into create_model.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from dist_scripts.fmnist_shards import write_shards  # tests/ is on sys.path (rootdir conftest)
from tiny_runs import TINY_VIT

pytestmark = pytest.mark.slow
MAX_STEPS, EVAL_EVERY, KILL_AT = 24, 4, 10
GOOD_LR, BAD_LRS = 3e-3, (1e-6, 2e-6)
MODEL_NAME = "vit-sweep-test"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fashion_mnist):
    """Run the sweep once; yields (outcome, mlflow client, marker path)."""
    from mlflow.tracking import MlflowClient

    from launch.driver import run_sweep
    from launch.sweep import compose

    work = tmp_path_factory.mktemp("sweep")
    train, val = write_shards(work / "data", n_train=1024, n_val=256, per_shard=128, src=fashion_mnist)
    marker = work / "killed"
    uri = f"sqlite:///{work}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.chdir(work)  # relative defaults (mlartifacts/) land in the temp dir
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("VITSCALE_SWEEP_FAULT", f"rank=1,step={KILL_AT},marker={marker}")
    overrides = [
        "+sweep=demo", *TINY_VIT, f"data.train_shards='{train}'", f"data.val_shards='{val}'",
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "trainer.precision=fp32",
        "trainer.global_batch_size=32", "trainer.micro_batch_size=16", f"trainer.max_steps={MAX_STEPS}",
        "trainer.log_every=2", f"trainer.checkpoint_every={EVAL_EVERY}", f"eval.every={EVAL_EVERY}",
        "eval.batch_size=64", "data.num_workers=1", "data.shuffle_buffer=100", "optim.schedule.warmup_steps=2",
        # eval/loss separates a learning rate that learns from one that does not after a few steps
        # (top-1 can tie at chance level), so ASHA's first cut is deterministic here.
        "sweep.metric=eval/loss", "sweep.mode=min", "sweep.scheduler.grace_period=8", "sweep.num_samples=1",
        "~sweep.search_space", f"+sweep.search_space={{optim.lr: {{grid: [{GOOD_LR}, {BAD_LRS[0]}, {BAD_LRS[1]}]}}}}",
        f"sweep.storage_path={work}/sweeps", f"sweep.register.name={MODEL_NAME}",
    ]
    try:
        outcome = run_sweep(compose(overrides))
    finally:
        mp.undo()
    yield outcome, MlflowClient(uri), marker


def _rows(outcome) -> list[dict]:
    with outcome.results_csv.open() as fh:
        return list(csv.DictReader(fh))


def test_trials_finish_and_asha_stops_the_bad_ones_early(sweep) -> None:
    outcome, _, _ = sweep
    rows = _rows(outcome)
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows), rows
    by_lr = {float(r["optim.lr"]): r for r in rows}
    good = by_lr[GOOD_LR]
    assert good["stopped_early"] == "False" and int(float(good["step"])) == MAX_STEPS
    for lr in BAD_LRS:  # stopped at ASHA's first rung (grace period 8 steps), well before max_steps
        assert by_lr[lr]["stopped_early"] == "True" and int(float(by_lr[lr]["step"])) < MAX_STEPS
    assert rows[0]["trial_id"] == good["trial_id"], "table is sorted best first"
    assert float(good["eval/loss"]) < min(float(by_lr[lr]["eval/loss"]) for lr in BAD_LRS)
    assert outcome.results_png.stat().st_size > 5000


def test_killed_worker_resumes_from_its_checkpoint(sweep) -> None:
    outcome, _, marker = sweep
    assert marker.is_file() and f"step {KILL_AT}" in marker.read_text()
    good = {float(r["optim.lr"]): r for r in _rows(outcome)}[GOOD_LR]
    resumed = int(float(good["resumed_from_step"]))
    # Resumed from a checkpoint reported before the kill (step 8, or 4 if Ray had not yet collected
    # the last report), not from scratch, and the trial still ran to the end.
    assert 0 < resumed < KILL_AT and resumed % EVAL_EVERY == 0
    assert int(float(good["step"])) == MAX_STEPS


def test_mlflow_parent_children_and_registered_best(sweep) -> None:
    outcome, client, _ = sweep
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["vitscale.sweep"] == "demo"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/sweep_results.csv", "sweep/sweep_results.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows = {r["trial_id"]: r for r in _rows(outcome)}
    assert sorted(c.data.tags["vitscale.trial_id"] for c in children) == sorted(rows)  # one run per trial
    for child in children:
        row = rows[child.data.tags["vitscale.trial_id"]]
        assert math.isclose(float(child.data.params["optim.lr"]), float(row["optim.lr"]))
        assert child.data.tags["vitscale.sweep.overrides"].startswith("optim.lr=")
        early = row["stopped_early"] == "True"
        assert child.data.tags["vitscale.sweep.early_stopped"] == str(early).lower()
        assert child.info.status == ("KILLED" if early else "FINISHED")

    best = outcome.table.iloc[0]
    version = client.get_model_version_by_alias(MODEL_NAME, "sweep-best")
    assert version.tags["vitscale.trial_id"] == best["trial_id"]
    assert outcome.registered is not None and outcome.registered.version == str(version.version)

    import torch

    from vitscale.engine.checkpoint import load_export
    from vitscale.models import create_model
    from vitscale.tracking import resolve_weights

    resolved = resolve_weights(f"models:/{MODEL_NAME}@sweep-best", tracking_uri=client.tracking_uri,
                               dst=outcome.sweep_dir / "resolved")
    state, config = load_export(Path(resolved.path))
    model = create_model(**config)
    model.load_state_dict(state)
    logits = model(torch.zeros(2, config["in_chans"], config["img_size"], config["img_size"]))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
