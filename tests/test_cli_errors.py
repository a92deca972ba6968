"""The CLIs turn a missing store, model, alias, version or run into one line on stderr (exit 1) that names
it and the store searched, and never create an empty store while looking (issue 16)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vitscale.evaluate import cli as evaluate_cli
from vitscale.figures import cli as figures_cli
from vitscale.tracking import register_export
from vitscale.tracking.where import main as where_main

MISSING_RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def store(cwd: Path, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """demo_work/mlflow.db with model `vit` (version 1, alias @best) and its run; MLFLOW_TRACKING_URI set."""
    db = cwd / "demo_work" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("vitscale", (cwd / "art").as_uri()))
    export = cwd / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")  # never downloaded: every lookup below fails first
    (export / "model_config.json").write_text("{}")
    register_export(client, run.info.run_id, export, "vit", aliases=("best",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return db, run.info.run_id


def _one_line(capsys: pytest.CaptureFixture, call, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: ")
    return err


def test_a_missing_store_is_named_and_not_created(cwd, capsys, mlflow_template_db):
    evaluate = lambda: evaluate_cli(["--weights", "models:/vit@latest", "--val-shards", "x", "--topk"])  # noqa: E731
    err = _one_line(capsys, evaluate, "python -m vitscale.evaluate")
    assert f"no MLflow store at {cwd / 'mlflow.db'}" in err and "MLFLOW_TRACKING_URI is unset" in err
    assert not (cwd / "mlflow.db").exists()
    # the store the demo wrote, one folder down, is suggested
    (cwd / "demo_work").mkdir()
    shutil.copy(mlflow_template_db, cwd / "demo_work" / "mlflow.db")
    err = _one_line(capsys, evaluate, "python -m vitscale.evaluate")
    assert f"export MLFLOW_TRACKING_URI=sqlite:///{cwd / 'demo_work' / 'mlflow.db'}" in err
    figures = lambda: figures_cli(["--weights", "runs:/" + MISSING_RUN, "--out", str(cwd / "f")])  # noqa: E731
    assert "no MLflow store at" in _one_line(capsys, figures, "python -m vitscale.figures")
    assert not (cwd / "mlflow.db").exists()


@pytest.mark.parametrize("weights, expected", [
    ("models:/nope@latest", "registered model 'nope' has no versions (so @latest names nothing): no model of that "
                            "name in the registry {db}"),
    ("models:/vit@candidate", "registered model 'vit' has no alias 'candidate' in the registry {db}"),
    ("models:/vit/9", "registered model 'vit' has no version 9 in the registry {db}"),
    (f"runs:/{MISSING_RUN}", f"unknown MLflow run '{MISSING_RUN}' in the store {{db}}"),
])
def test_missing_model_alias_version_run_are_one_line(store, capsys, weights, expected):
    db, _ = store
    err = _one_line(capsys, lambda: evaluate_cli(["--weights", weights, "--val-shards", "x", "--topk"]),
                    "python -m vitscale.evaluate")
    assert expected.format(db=f"sqlite:///{db}") in err and "from $MLFLOW_TRACKING_URI" in err
    if "'vit'" in expected:  # what exists instead
        assert "(it has newest version 1, aliases @best)" in err


def test_a_missing_run_id_fails_before_any_work(store, capsys):
    db, _ = store
    for call, prog in ((lambda: evaluate_cli(["--weights", "models:/vit@best", "--val-shards", "x", "--topk",
                                               "--run-id", MISSING_RUN]), "python -m vitscale.evaluate"),
                       (lambda: figures_cli(["--metrics", "m.jsonl", "--run-id", MISSING_RUN]),
                        "python -m vitscale.figures")):
        err = _one_line(capsys, call, prog)
        assert f"unknown MLflow run '{MISSING_RUN}' in the store sqlite:///{db}" in err


def test_where_prints_the_export_line_and_the_runs_list(store, capsys):
    db, run_id = store
    lines = where_main(["--experiment", "vitscale"])
    exp_id = MlflowClient(f"sqlite:///{db}").get_run(run_id).info.experiment_id
    assert f"Use it in later commands: export MLFLOW_TRACKING_URI=sqlite:///{db}" in lines
    assert lines[-1].endswith(f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning")
    assert any(line.startswith("Start the UI: ") and "ui --backend-store-uri" in line for line in lines)
    with pytest.raises(LookupError, match=f"no MLflow experiment 'nope' in the store sqlite:///{db}"):
        where_main(["--experiment", "nope"])
