"""Issue 5's registry and fine-tuning flow through the real ``vitscale/train.py`` with MLflow on.

One process per launch (plain ``python vitscale/train.py``, a world of 1) against a throw-away sqlite
store, a tiny ViT and real Fashion-MNIST shards written by data_tools:

- pre-training registers versions (every K checkpoints and at the end) with tags, aliases, the
  config/DeepSpeed artifacts, per-step metrics, provenance tags and the figures;
- fine-tuning from ``models:/NAME@latest`` at twice the resolution with another class count records
  its lineage, starts from a zero head (first loss = ln(classes)), resamples the position
  embeddings and trains with SGD; ``runs:/ID`` and a local export resolve too;
- an interrupted pre-training resumed with ``resume=runs:/ID`` after its output_dir was deleted
  (tracking.log_checkpoints) continues the same MLflow run and reproduces the uninterrupted losses.

The launches are marked slow (about 2.5 minutes for all on 2 busy cores); the checkpoint-upload guard
has a fast unit test at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_scripts.fmnist_shards import write_shards  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP_AT = 6, 4  # the interrupted run stops at STOP_AT (a checkpoint), the resumed one ends at STEPS
MODEL_NAME = "tiny-fmnist"
FT_CLASSES = 20  # > the data's 10 labels, so every label is valid and a zero head gives ln(20)
SMALL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "trainer.micro_batch_size=16",
         "trainer.global_batch_size=16", "trainer.log_every=1", "data.num_workers=0", "data.shuffle_buffer=64",
         "eval.batch_size=64", "tracking.experiment=e2e", "trainer.precision=fp32"]
TINY = ["model=vit_demo", "data=fashion_mnist", "deepspeed=zero1", *SMALL]
# demo_finetune (ZeRO-2) with the paper's fine-tuning recipe (finetune_384's: SGD momentum 0.9, no weight
# decay, warm-up + cosine) at 2x the 28 px pre-training resolution.
FINETUNE = ["+experiment=demo_finetune", "model=vit_demo", *SMALL, "model.img_size=56", "optim=sgd_finetune", "optim.weight_decay=0.0",
            "tracking.register_name=null", "tracking.figures=false"]
# Warm-up longer than the run: the LR changes every step (so a lost schedule position shows) and does
# not depend on max_steps (so a run stopped by max_steps is a true prefix of the longer one).
PRETRAIN = [*TINY, "optim=adam_pretrain", "optim.lr=3e-3", "optim.schedule.warmup_steps=100",
            "model.dropout=0.1", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=0",
            "tracking.log_checkpoints=true"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "VITSCALE_CACHE": str(tmp / "cache"),
            "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class Store:
    """The tmp working directory (mlflow.db, mlartifacts/) every launch and client shares."""

    def __init__(self, root: Path, shards: list[str]) -> None:
        self.root, self.shards = root, shards
        from mlflow import MlflowClient

        uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def train(self, name: str, overrides: list[str]) -> Path:
        """One ``python vitscale/train.py`` launch (a world of 1) in the store's directory; must succeed."""
        out = self.root / name
        cmd = [sys.executable, str(REPO / "vitscale" / "train.py"), f"output_dir={out}", *self.shards, *overrides]
        proc = subprocess.run(cmd, cwd=self.root, env=_env(self.root), capture_output=True, text=True, timeout=300)
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
        return out

    def run_id(self, out: Path) -> str:
        return (out / "tracking" / "run_id").read_text().strip()

    def artifacts(self, run_id: str, path: str = "") -> set[str]:
        return {f.path for f in self.client.list_artifacts(run_id, path)}

    def history(self, run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> Store:
    root = tmp_path_factory.mktemp("e2e")
    train, val = write_shards(root / "fmnist", n_train=256, n_val=64, per_shard=64, src=fashion_mnist)
    return Store(root, [f"data.train_shards='{train}'", f"data.val_shards='{val}'"])


@pytest.fixture(scope="module")
def pretrain(store: Store) -> Path:
    """The uninterrupted reference: registers at steps 2 and 4 (register_every) and at the end."""
    return store.train("pretrain", [*PRETRAIN, f"trainer.max_steps={STEPS}", "eval.every=2",
                                    f"tracking.register_name={MODEL_NAME}", "tracking.register_every=2"])


@pytest.mark.slow
def test_pretrain_run_holds_config_metrics_provenance_and_figures(store: Store, pretrain: Path) -> None:
    from mlflow.artifacts import download_artifacts

    run = store.client.get_run(store.run_id(pretrain))
    params = run.data.params
    assert params["model.embed_dim"] == "32" and params["trainer.max_steps"] == str(STEPS)
    assert params["optim.name"] == "adamw" and params["tracking.register_name"] == MODEL_NAME
    assert {"config/config.yaml", "config/deepspeed_config.json"} <= store.artifacts(run.info.run_id, "config")
    ds = json.loads(Path(download_artifacts(run_id=run.info.run_id, artifact_path="config/deepspeed_config.json",
                                            dst_path=str(store.root / "dl"), tracking_uri=store.client.tracking_uri))
                    .read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["zero_optimization"]["stage"] == 1
    assert sorted(store.history(run.info.run_id, "loss")) == list(range(1, STEPS + 1))
    assert sorted(store.history(run.info.run_id, "lr")) == list(range(1, STEPS + 1))
    assert sorted(store.history(run.info.run_id, "eval/top1")) == [2, 4, STEPS]
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert len(tags["data.train_fingerprint"]) >= 16 and "data.val_fingerprint" in tags
    assert run.info.status == "FINISHED"
    figures = {Path(p).name for p in store.artifacts(run.info.run_id, "figures")}
    assert {"training_curves.png", "patch_embedding_pcs.png", "position_embedding_similarity.png",
            "attention_distance.png"} <= figures


@pytest.mark.slow
def test_registered_versions_aliases_and_tags(store: Store, pretrain: Path) -> None:
    from vitscale.engine.checkpoint import load_export
    from vitscale.tracking import resolve_weights

    run_id = store.run_id(pretrain)
    versions = sorted(store.client.search_model_versions(f"name = '{MODEL_NAME}'"), key=lambda v: int(v.version))
    assert [v.tags["step"] for v in versions] == ["2", "4", str(STEPS)]  # register_every=2, then the end
    for v in versions:
        assert v.run_id == run_id and v.tags["source_run_id"] == run_id
        assert {"metric.loss", "metric.eval/top1", "metric.lr"} <= set(v.tags)
    assert {f"export/step_{s:08d}" for s in (2, 4, STEPS)} <= store.artifacts(run_id, "export")
    latest = resolve_weights(f"models:/{MODEL_NAME}@latest", tracking_uri=store.client.tracking_uri,
                             dst=store.root / "latest_weights")
    assert latest.version == str(versions[-1].version) and latest.run_id == run_id
    state, config = load_export(latest.path)
    reference, _ = load_export(pretrain / "export" / f"step_{STEPS:08d}")
    assert config["embed_dim"] == 32 and all((state[k] == reference[k]).all() for k in reference)
    best = store.client.get_model_version_by_alias(MODEL_NAME, "best")
    top1 = {v.version: float(v.tags["metric.eval/top1"]) for v in versions}
    assert top1[best.version] == max(top1.values())
    # The first version whose top-1 equals the maximum holds `best` (ties never move it).
    assert best.version == next(v for v, t in top1.items() if t == max(top1.values()))


@pytest.fixture(scope="module")
def finetune(store: Store, pretrain: Path) -> Path:
    return store.train("finetune", [*FINETUNE, f"finetune.source=models:/{MODEL_NAME}@latest",
                                    f"finetune.num_classes={FT_CLASSES}", "optim.lr=0.05",
                                    "optim.schedule.warmup_steps=2", "trainer.max_steps=4",
                                    "trainer.checkpoint_every=4"])


@pytest.mark.slow
def test_finetune_from_registry_at_twice_the_resolution(store: Store, pretrain: Path, finetune: Path) -> None:
    from vitscale.engine.checkpoint import load_export

    newest = max(store.client.search_model_versions(f"name = '{MODEL_NAME}'"), key=lambda v: int(v.version))
    run = store.client.get_run(store.run_id(finetune))
    tags = run.data.tags
    assert tags["finetune.source_uri"] == f"models:/{MODEL_NAME}@latest"
    assert tags["finetune.source_model"] == MODEL_NAME and tags["finetune.source_version"] == str(newest.version)
    assert tags["finetune.source_run_id"] == store.run_id(pretrain)
    # A zero-initialised head makes every logit 0: the first step's loss is exactly ln(classes).
    first = losses(finetune)[1]
    assert abs(first - math.log(FT_CLASSES)) < 1e-5, first
    # The fine-tuning recipe: SGD with momentum, warm-up + cosine, and the LR it logged follows it.
    params = run.data.params
    assert params["optim.name"] == "sgd" and params["optim.momentum"] == "0.9" and params["optim.weight_decay"] == "0.0"
    assert params["optim.schedule.name"] == "warmup_cosine" and params["model.img_size"] == "56"
    # DeepSpeed's WarmupCosineLR over 4 steps, warm-up 2, peak 0.05: iterations -1 (not started) and 0
    # give 0, iteration 1 half the peak, iteration 2 is half-way down the cosine over the last 2 steps.
    lr = store.history(run.info.run_id, "lr")
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx([0.0, 0.0, 0.025, 0.025])
    assert losses(finetune)[4] < first - 1e-3  # and the SGD steps did move the weights
    # The export: a 20-class head and 56/7 = 8 x 8 position embeddings (+ cls) resampled from 4 x 4.
    state, config = load_export(finetune / "export" / "step_00000004")
    pre, _ = load_export(pretrain / "export" / f"step_{STEPS:08d}")
    assert pre["pos_embed"].shape == (1, 1 + 16, 32)
    assert state["pos_embed"].shape == (1, 1 + 64, 32) and state["head.weight"].shape == (FT_CLASSES, 32)
    assert config["num_classes"] == FT_CLASSES and config["img_size"] == 56


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.slow
def test_finetune_source_runs_uri_and_local_export_resolve(store: Store, pretrain: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The other two source forms, through vitscale.start.model_for, the entry point's resolution (no launch needed: the
    launch path is the one test_finetune_from_registry_at_twice_the_resolution exercises). The store
    comes from tracking.uri alone, as for a job pointed at a server by config."""
    from vitscale.start import model_for
    from vitscale.engine.checkpoint import load_export
    from vitscale.tracking.lineage import source_lineage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VITSCALE_CACHE", str(store.root / "cache"))
    pre_id = store.run_id(pretrain)
    local = pretrain / "export" / "step_00000002"
    for source, weights_from, lineage in (
            (f"runs:/{pre_id}/export/step_00000004", pretrain / "export" / "step_00000004",
             {"finetune.source_run_id": pre_id}),
            (str(local), local, {"finetune.source_path": str(local.resolve())})):
        cfg = _compose([*FINETUNE, f"finetune.source={source}", f"tracking.uri={store.client.tracking_uri}"])
        model, loaded = model_for(cfg)
        expected, _ = load_export(weights_from)
        state = model.state_dict()
        assert state["pos_embed"].shape == (1, 1 + 64, 32)  # 56 px / patch 7, resampled from 4 x 4
        assert not state["head.weight"].any() and not state["head.bias"].any()
        assert state["head.weight"].shape == (10, 32)
        assert all((state[k] == v).all() for k, v in expected.items() if not k.startswith(("head.", "pos_embed")))
        assert lineage.items() <= source_lineage(store.client, source).items()
        assert lineage.items() <= loaded.items()  # the trainer's tags: from the weights it loaded


@pytest.mark.slow
def test_resume_from_run_artifacts_after_output_dir_is_gone(store: Store, pretrain: Path) -> None:
    interrupted = store.train("interrupted", [*PRETRAIN, f"trainer.max_steps={STOP_AT}", "eval.every=0",
                                              "data.val_shards=null", "trainer.export_at_end=false"])
    run_id = store.run_id(interrupted)
    uploaded = store.artifacts(run_id, "checkpoints")
    assert {"checkpoints/latest", f"checkpoints/step_{STOP_AT:08d}"} <= uploaded
    shutil.rmtree(interrupted)  # only the MLflow run is left
    resumed = store.train("resumed", [*PRETRAIN, f"trainer.max_steps={STEPS}", f"resume=runs:/{run_id}",
                                      "eval.every=0", "data.val_shards=null", "trainer.export_at_end=false"])
    log = (store.root / "resumed.log").read_text()
    assert f"resumed from {store.root / 'cache'}" in log  # the downloaded artifacts, not a disk path
    assert store.run_id(resumed) == run_id  # the same MLflow run continues
    reference, curve = losses(pretrain), losses(resumed)
    assert sorted(curve) == list(range(STOP_AT + 1, STEPS + 1))
    for step in curve:
        assert abs(curve[step] - reference[step]) <= 1e-5, f"step {step}: {curve[step]} vs {reference[step]}"
    history = store.history(run_id, "loss")
    assert sorted(history) == list(range(1, STEPS + 1))
    assert store.client.get_run(run_id).info.status == "FINISHED"


class _RecordingTracker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def log_checkpoint(self, root: Path, tag: str) -> None:
        self.calls.append(("log_checkpoint", (Path(root), tag)))

    def flush(self) -> bool:
        self.calls.append(("flush", ()))
        return True


@pytest.mark.parametrize("rank_files, uploaded", [((0, 1), True), ((0,), False)])
def test_checkpoint_upload_only_when_rank_0_sees_every_rank(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            rank_files: tuple[int, ...], uploaded: bool) -> None:
    """A world of 2 whose rank 1 wrote to a disk rank 0 cannot see must not upload half a checkpoint."""
    import torch

    from vitscale.engine.checkpoint import CheckpointRef
    from vitscale.engine.distributed import DistInfo
    from vitscale.engine.trainer import Trainer

    ref = CheckpointRef(tmp_path / "checkpoints", "step_00000002")
    ref.path.mkdir(parents=True)
    for r in rank_files:
        (ref.path / f"rank_{r}.pt").write_bytes(b"")
    trainer = Trainer.__new__(Trainer)  # only the upload rule is under test: no process group, no engine
    trainer.dist = DistInfo(0, 2, 0, "torchrun", torch.device("cpu"), "gloo", True)
    trainer.tracker = _RecordingTracker()
    trainer.warned_unshared = False
    for _ in range(2):
        trainer._upload_checkpoint(ref)
    if uploaded:
        assert trainer.tracker.calls == [("log_checkpoint", (ref.root, ref.tag)), ("flush", ())] * 2
    else:
        assert trainer.tracker.calls == []
        warnings = [r for r in caplog.records if "log_checkpoints" in r.getMessage()]
        assert len(warnings) == 1 and "[1]" in warnings[0].getMessage()  # once, naming the missing rank


@pytest.mark.parametrize("every, ckpt_every, ok", [(0, 0, True), (4, 2, True), (3, 2, False), (2, 0, False)])
def test_register_every_must_fall_on_checkpoints(every: int, ckpt_every: int, ok: bool) -> None:
    from vitscale.config import ConfigError, validate

    cfg = _compose([*TINY, f"tracking.register_every={every}", f"trainer.checkpoint_every={ckpt_every}",
                    "data.train_shards=/shards/train-000000.tar"])
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="tracking.register_every=.* multiple of trainer.checkpoint_every"):
            validate(cfg)
