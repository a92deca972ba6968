"""Registry flow: export -> model version with aliases/tags -> resolve_weights / resolve_resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from vitscale.tracking import make_tracker, parse_uri, resolve_resume, resolve_weights
from vitscale.tracking.uris import LocalURI, ModelURI, RunURI



@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what resolve_* use when no URI is passed
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def _export(root: Path, value: float) -> Path:
    root.mkdir(parents=True)
    save_file({"head.weight": torch.full((2, 3), value)}, root / "model.safetensors")
    (root / "model_config.json").write_text(json.dumps({"name": "vit_tiny", "embed_dim": 3}))
    (root / "train_config.yaml").write_text("seed: 0\n")
    return root


def _started_tracker(tmp_path: Path, uri: str):
    cfg = {"output_dir": str(tmp_path / "out"),
           "tracking": {"uri": uri, "experiment": "reg", "artifact_dir": str(tmp_path / "mlartifacts")}}
    tracker = make_tracker(cfg, 0)
    tracker.start(cfg)
    return tracker


def test_parse_uri_forms():
    assert parse_uri("models:/vit@best") == ModelURI("vit", alias="best")
    assert parse_uri("models:/vit/3") == ModelURI("vit", version="3")
    assert parse_uri("models:/vit@latest").latest and parse_uri("models:/vit/latest").latest
    assert parse_uri("runs:/abc/export/step_1") == RunURI("abc", "export/step_1")
    assert parse_uri("runs:/abc") == RunURI("abc", "")
    assert parse_uri("/tmp/x") == LocalURI(Path("/tmp/x"))
    for bad in ("models:/", "models:/vit", "runs:/", "s3://bucket/x", ""):
        with pytest.raises(ValueError, match="expected"):
            parse_uri(bad)


def test_register_moves_best_only_on_improvement_and_resolves(tmp_path, store):
    tracker = _started_tracker(tmp_path, store)
    versions = [tracker.register(_export(tmp_path / f"exp{i}", float(i)), "vit-unit", step=100 * i,
                                 metrics={"val_top1": acc, "val_loss": 1 - acc}, best_metric="val_top1",
                                 aliases=("latest", "candidate"))
                for i, acc in enumerate([0.5, 0.4, 0.7])]
    tracker.end()
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert versions[0].aliases == ("latest", "candidate", "best")
    assert versions[1].aliases == ("latest", "candidate")  # 0.4 < 0.5: best stays on version 1

    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("vit-unit", "best").version) == "3"
    assert str(client.get_model_version_by_alias("vit-unit", "candidate").version) == "3"
    v2 = client.get_model_version("vit-unit", "2")
    assert v2.tags["step"] == "100" and v2.tags["source_run_id"] == tracker.run_id
    assert float(v2.tags["metric.val_top1"]) == 0.4

    best = resolve_weights("models:/vit-unit@best")
    assert (best.model_name, best.version, best.run_id) == ("vit-unit", "3", tracker.run_id)
    assert load_file(best / "model.safetensors")["head.weight"][0, 0].item() == 2.0
    assert {p.name for p in best.path.iterdir()} == {"model.safetensors", "model_config.json", "train_config.yaml"}
    assert best.lineage_tags()["finetune.source_version"] == "3"
    assert resolve_weights("models:/vit-unit@latest").version == "3"
    first = resolve_weights("models:/vit-unit/1")
    assert load_file(first / "model.safetensors")["head.weight"][0, 0].item() == 0.0
    by_run = resolve_weights(f"runs:/{tracker.run_id}")  # newest export of the run
    assert by_run.path.name.endswith("step_00000200") and by_run.run_id == tracker.run_id
    explicit = resolve_weights(f"runs:/{tracker.run_id}/export/step_00000100")
    assert load_file(explicit / "model.safetensors")["head.weight"][0, 0].item() == 1.0


def test_finetune_run_records_its_source_version(tmp_path, store):
    source = _started_tracker(tmp_path, store)
    source.register(_export(tmp_path / "exp0", 0.0), "vit-src", step=1)
    source.register(_export(tmp_path / "exp1", 1.0), "vit-src", step=2, metrics={"eval/top1": 0.9},
                    best_metric="eval/top1")
    source.register(_export(tmp_path / "exp2", 2.0), "vit-src", step=3)
    source.end()
    cfg = {"output_dir": str(tmp_path / "ft"), "finetune": {"source": "models:/vit-src@best"},
           "tracking": {"uri": store, "experiment": "reg"}}
    finetune = make_tracker(cfg, 0)
    finetune.start(cfg)
    finetune.end()
    tags = MlflowClient(store).get_run(finetune.run_id).data.tags
    assert tags["finetune.source_uri"] == "models:/vit-src@best"
    assert (tags["finetune.source_model"], tags["finetune.source_version"]) == ("vit-src", "2")
    assert tags["finetune.source_run_id"] == source.run_id


def test_resolve_errors_are_one_clear_line(tmp_path, store):
    tracker = _started_tracker(tmp_path, store)
    tracker.register(_export(tmp_path / "exp", 1.0), "vit-err", step=1)
    tracker.end()
    with pytest.raises(LookupError, match="'vit-err' has no alias 'nope'"):
        resolve_weights("models:/vit-err@nope")
    with pytest.raises(LookupError, match="'vit-err' has no version 9"):
        resolve_weights("models:/vit-err/9")
    with pytest.raises(LookupError, match="'missing' has no"):
        resolve_weights("models:/missing@best")
    with pytest.raises(LookupError, match="unknown MLflow run '0123456789abcdef0123456789abcdef'"):
        resolve_weights("runs:/0123456789abcdef0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks model_config.json"):
        resolve_weights(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="lacks"):
        tracker.register(tmp_path / "half", "vit-err")


def test_register_without_the_best_metric_still_publishes(tmp_path, store, caplog):
    tracker = _started_tracker(tmp_path, store)
    version = tracker.register(_export(tmp_path / "exp", 1.0), "vit-noeval", step=3, metrics={"loss": 0.7},
                               best_metric="eval/top1")
    tracker.end()
    assert version is not None and version.aliases == ("latest",)
    assert "without moving 'best'" in caplog.text
    assert resolve_weights("models:/vit-noeval@latest").version == "1"
    with pytest.raises(LookupError, match="has no alias 'best'"):
        resolve_weights("models:/vit-noeval@best")


def test_resolve_weights_local_forms(tmp_path):
    export = _export(tmp_path / "out" / "export" / "step_5", 5.0)
    assert resolve_weights(export).path == export
    assert resolve_weights(str(export / "model.safetensors")).path == export
    assert resolve_weights(tmp_path / "out").path == export  # an output_dir: its newest export


def _checkpoint(root: Path, tag: str) -> Path:
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (root / "latest").write_text(tag)
    return root


def test_resolve_resume_from_output_dir_then_from_artifacts(tmp_path, store):
    tracker = _started_tracker(tmp_path, store)
    root = _checkpoint(tmp_path / "out" / "checkpoints", "global_step20")
    tracker.log_checkpoint(root, "global_step20")
    tracker.end()

    local = resolve_resume(f"runs:/{tracker.run_id}")  # the run's output_dir is on this disk
    assert (local.path, local.tag, local.run_id) == (root, "global_step20", tracker.run_id)

    shutil.rmtree(tmp_path / "out")  # another machine: only the run's artifacts remain
    remote = resolve_resume(f"runs:/{tracker.run_id}")
    assert remote.tag == "global_step20" and (remote / "latest").read_text() == "global_step20"
    assert (remote / "global_step20" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"

    bare = _started_tracker(tmp_path / "other", store)
    bare.end()
    with pytest.raises(LookupError, match="has no DeepSpeed checkpoint"):
        resolve_resume(f"runs:/{bare.run_id}")
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint at"):
        resolve_resume(tmp_path / "nowhere")
    assert resolve_resume(_checkpoint(tmp_path / "ck", "t1")).tag == "t1"
