"""MLflow run lifecycle: config/params/tags/artifacts, batched metrics, resume, sweeps, outages."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vitscale.tracking import MlflowTracker, NullTracker, TrackingError, TrackingSettings, make_tracker

matplotlib.use("Agg")



@pytest.fixture
def store(tmp_path, mlflow_template_db, monkeypatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{db}"


def _cfg(tmp_path: Path, uri: str, **tracking) -> dict:
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "manifest.json").write_text(json.dumps({"source_fingerprint": "sha256:abc123", "num_samples": 7}))
    return {
        "output_dir": str(tmp_path / "out"),
        "model": {"name": "vit_tiny", "depth": 2, "blocks": [1, 2, 3], "note": "x" * 7000},
        "data": {"train_shards": str(shards / "train-{000000..000003}.tar")},
        "tracking": {"uri": uri, "experiment": "unit", "artifact_dir": str(tmp_path / "mlartifacts"), **tracking},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_zero_rank_and_disabled_get_null_tracker(tmp_path, store):
    assert isinstance(make_tracker(_cfg(tmp_path, store), rank=1), NullTracker)
    assert isinstance(make_tracker(_cfg(tmp_path, store, enabled=False), rank=0), NullTracker)
    with pytest.raises(ValueError, match="unknown tracking.* keys.*'urii'"):
        make_tracker({"tracking": {"urii": "x"}}, rank=0)


def test_run_records_config_metrics_artifacts_and_provenance(tmp_path, store):
    import matplotlib.pyplot as plt

    cfg = _cfg(tmp_path, store)
    tracker = make_tracker(cfg, rank=0)
    assert isinstance(tracker, MlflowTracker)
    tracker.start(cfg, ds_config={"zero_optimization": {"stage": 2}}, tags={"purpose": "unit"})
    for step in range(2500):  # more than one log_batch (1000 metrics) worth
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.log_metrics({"grad_norm": float("nan"), "scale": float("inf"), "note": "text", "none": None}, 2500)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = tracker.log_figure(fig, "curves")
    plt.close(fig)
    tracker.end()

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.depth"] == "2"
    assert run.data.params["model.blocks"] == "[1, 2, 3]"
    assert run.data.params["model.note"].endswith("[truncated; see config/config.yaml]")
    assert run.data.tags["data.train_fingerprint"] == "sha256:abc123"
    assert run.data.tags["purpose"] == "unit"
    assert run.data.tags["vitscale.output_dir"] == str(tmp_path / "out")
    assert "mlflow.source.git.commit" in run.data.tags or shutil.which("git") is None
    assert math.isnan(run.data.metrics["grad_norm"]) and run.data.metrics["scale"] >= 1e308  # MLflow clamps inf
    assert "note" not in run.data.metrics and "none" not in run.data.metrics  # skipped, with a warning
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(2500))
    artifacts = {f.path for d in ("config", "figures") for f in client.list_artifacts(tracker.run_id, d)}
    assert artifacts == {"config/config.yaml", "config/deepspeed_config.json", "figures/curves.png"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlartifacts").is_dir()  # embedded store keeps artifacts where configured


def test_fine_tune_lineage_is_the_version_the_trainer_loaded(tmp_path, store, monkeypatch):
    """The trainer passes the lineage of the weights it loaded; the tracker must record those and not
    resolve finetune.source again (an alias moved in between would name another version). Without
    them it falls back to resolving the source itself."""
    import vitscale.tracking.mlflow_tracker as mt

    resolved_again: list[str] = []
    monkeypatch.setattr(mt, "source_lineage", lambda client, uri: resolved_again.append(uri) or
                        {"finetune.source_uri": uri, "finetune.source_version": "99"})
    loaded = {"finetune.source_uri": "models:/vit@best", "finetune.source_model": "vit",
              "finetune.source_version": "3", "finetune.source_run_id": "abc"}
    cfg = {**_cfg(tmp_path, store), "finetune": {"source": "models:/vit@best"}}
    tracker = make_tracker(cfg, rank=0)
    tracker.start(cfg, tags=loaded)
    tracker.end()
    assert resolved_again == []
    assert loaded.items() <= MlflowClient(store).get_run(tracker.run_id).data.tags.items()

    cfg = {**_cfg(tmp_path, store), "output_dir": str(tmp_path / "out2"), "finetune": {"source": "models:/vit@best"}}
    tracker = make_tracker(cfg, rank=0)
    tracker.start(cfg)
    tracker.end()
    assert resolved_again == ["models:/vit@best"]
    assert MlflowClient(store).get_run(tracker.run_id).data.tags["finetune.source_version"] == "99"


def test_resume_reopens_the_same_run(tmp_path, store, caplog):
    cfg = _cfg(tmp_path, store)
    first = make_tracker(cfg, 0)
    first.start(cfg)
    first.log_metrics({"loss": 2.0}, 0)
    first.end("KILLED")

    cfg2 = _cfg(tmp_path, store) | {"resume": f"runs:/{first.run_id}"}
    cfg2["model"] = dict(cfg2["model"], depth=3)
    second = make_tracker(cfg2, 0)
    with caplog.at_level(logging.WARNING, logger="vitscale.tracking"):
        second.start(cfg2)
    second.log_metrics({"loss": 1.0}, 1)
    second.end()
    assert second.run_id == first.run_id
    run = MlflowClient(store).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.depth"] == "2"  # params are immutable: the original is kept...
    assert "1 changed params" in caplog.text and "model.depth" in caplog.text  # ...and the change is reported
    assert [m.step for m in MlflowClient(store).get_metric_history(first.run_id, "loss")] == [0, 1]


def test_restarted_trial_reattaches_to_its_child_run(tmp_path, store):
    client = MlflowClient(store)
    exp = client.create_experiment("unit", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp).info.run_id
    runs = []
    for attempt in range(2):
        cfg = _cfg(tmp_path, store, parent_run_id=parent, trial_id="trial_0007")
        tracker = make_tracker(cfg, 0)
        tracker.start(cfg)
        tracker.log_metrics({"loss": float(attempt)}, attempt)
        tracker.end("FAILED" if attempt == 0 else "FINISHED")
        runs.append(tracker.run_id)
    assert runs[0] == runs[1]
    run = client.get_run(runs[0])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["vitscale.trial_id"] == "trial_0007"


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_unreachable_server_never_stops_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = _cfg(tmp_path, uri, retries=2, backoff_s=0.5, retry_interval_s=30)
    clock = _FakeClock()
    tracker = MlflowTracker(TrackingSettings.from_mapping(cfg["tracking"]), tmp_path / "out",
                            clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="vitscale.tracking"):
        tracker.start(cfg)
        for step in range(20):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step)
            clock.now += 5.0  # 100 s of "training": a few retry windows pass
        tracker.end()
    assert clock.sleeps[:1] == [0.5]  # retried with backoff before giving up
    assert tracker.run_id is None and tracker.failures >= 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("buffering and retrying" in r.getMessage() for r in warnings) == 1  # one line, then a count
    unsent = (tmp_path / "out" / "tracking" / "unsent_metrics.jsonl").read_text().splitlines()
    assert len(unsent) == 40 and json.loads(unsent[-1])["step"] == 19  # nothing lost silently


def test_unreachable_server_is_fatal_in_strict_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_free_port()}", strict=True, retries=1)
    tracker = make_tracker(cfg, 0)
    with pytest.raises(TrackingError, match="open run failed.*tracking.strict=true"):
        tracker.start(cfg)


def test_outage_mid_run_buffers_then_flushes_in_order(tmp_path, store, caplog):
    cfg = _cfg(tmp_path, store, retries=2, retry_interval_s=30, flush_interval_s=0)
    clock = _FakeClock()
    tracker = MlflowTracker(TrackingSettings.from_mapping(cfg["tracking"]), tmp_path / "out",
                            clock=clock, sleep=clock.sleep)
    tracker.start(cfg)
    client = tracker._client_or_create()
    real_log_batch = client.log_batch
    down = {"on": True}

    def flaky_log_batch(*args, **kwargs):
        if down["on"]:
            raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return real_log_batch(*args, **kwargs)

    client.log_batch = flaky_log_batch
    with caplog.at_level(logging.WARNING, logger="vitscale.tracking"):
        for step in range(10):
            tracker.log_metrics({"loss": float(step)}, step)
            clock.now += 1.0
        assert tracker.pending == 10  # buffered, not lost, not blocking
        down["on"] = False
        clock.now += 30.0  # the next retry window opens
        tracker.log_metrics({"loss": 10.0}, 10)
        assert tracker.pending == 0
        tracker.end()
    history = MlflowClient(store).get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == list(range(11))
    assert "reachable again" in caplog.text


def test_auto_resume_continues_the_run_recorded_in_output_dir(tmp_path, store):
    cfg = _cfg(tmp_path, store) | {"resume": "auto"}
    first = make_tracker(cfg, 0)
    first.start(cfg)
    first.end("KILLED")
    assert make_tracker(cfg, 0).settings.run_id is None  # no checkpoint yet: a fresh run
    # A checkpoint with a manifest but no `latest` (lost): resume=auto resumes from it, so the run continues too.
    (tmp_path / "out" / "checkpoints" / "step_00000010").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step_00000010" / "manifest.json").write_text("{}")
    second = make_tracker(cfg, 0)
    second.start(cfg)
    second.end()
    assert second.run_id == first.run_id


def _start_server(port: int, root: Path) -> subprocess.Popen:
    """A real `mlflow server` in its own process group (its workers outlive a plain kill)."""
    log_file = (root / f"server-{port}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    _stop_server(proc)
    pytest.fail(f"mlflow server did not come up; see {root}/server-{port}.log")


def _stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.mark.slow
def test_real_server_stopped_and_restarted_mid_run(tmp_path, monkeypatch):
    """The outage users actually have: the server process dies and comes back on the same store."""
    from vitscale.tracking import resolve_weights

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(port, tmp_path)
    try:
        cfg = _cfg(tmp_path, uri, retries=1, retry_interval_s=0.2, flush_interval_s=0)
        del cfg["tracking"]["artifact_dir"]
        tracker = make_tracker(cfg, 0)
        tracker.start(cfg)
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step)
        assert tracker.pending == 0 and tracker.run_id
        _stop_server(server)

        for step in range(5, 10):
            tracker.log_metrics({"loss": float(step)}, step)
        export = tmp_path / "export"
        export.mkdir()
        (export / "model.safetensors").write_bytes(b"not-really-weights")
        (export / "model_config.json").write_text("{}")
        assert tracker.register(export, "vit-server", step=10, metrics={"eval/top1": 0.5},
                                best_metric="eval/top1") is None  # queued while down
        assert tracker.pending >= 6 and tracker.failures >= 1

        server = _start_server(port, tmp_path)
        time.sleep(0.3)  # past the retry interval
        tracker.log_metrics({"loss": 10.0}, 10)
        assert tracker.pending == 0
        tracker.end()
        client = MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(11))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        resolved = resolve_weights("models:/vit-server@best", tracking_uri=uri)
        assert resolved.version == "1" and (resolved / "model.safetensors").read_bytes() == b"not-really-weights"
    finally:
        _stop_server(server)


# ------------------------------------------------------------------ run names, UI URL, lineage (issue 16)
def test_run_names_differ_even_with_seeded_random_and_run_name_wins(tmp_path, store):
    """The trainer seeds Python's `random` before the run opens; MLflow's generated names come from it,
    so every run used to be called the same. Names are now the config name + time + a secrets suffix."""
    import random

    names = []
    for out in ("a", "b"):
        cfg = {**_cfg(tmp_path, store), "name": "demo_pretrain", "output_dir": str(tmp_path / out)}
        random.seed(0)
        tracker = make_tracker(cfg, rank=0)
        tracker.start(cfg)
        tracker.end()
        names.append(MlflowClient(store).get_run(tracker.run_id).info.run_name)
    assert names[0] != names[1]
    assert all(n.startswith("demo_pretrain-") for n in names)
    cfg = {**_cfg(tmp_path, store, run_name="my-run"), "output_dir": str(tmp_path / "c")}
    tracker = make_tracker(cfg, rank=0)
    tracker.start(cfg)
    tracker.end()
    assert MlflowClient(store).get_run(tracker.run_id).info.run_name == "my-run"


def test_run_start_logs_the_runs_list_url(tmp_path, store, caplog):
    from vitscale.tracking import experiment_url

    caplog.set_level(logging.INFO, logger="vitscale.tracking")
    cfg = _cfg(tmp_path, store)
    tracker = make_tracker(cfg, rank=0)
    tracker.start(cfg)
    tracker.end()
    exp_id = MlflowClient(store).get_run(tracker.run_id).info.experiment_id
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning"
    assert url in caplog.text and f"--backend-store-uri {store}" in caplog.text
    # a server: its own address, credentials never printed
    assert experiment_url("https://bot:secret@mlflow.internal:8443/", "7") == \
        "https://mlflow.internal:8443/#/experiments/7?workflowType=machine_learning"


def test_fine_tuned_version_links_to_its_source_version_and_run(tmp_path, store):
    from safetensors.torch import save_file

    def export(root: Path) -> Path:
        root.mkdir(parents=True)
        save_file({"w": __import__("torch").zeros(2)}, root / "model.safetensors")
        (root / "model_config.json").write_text("{}")
        return root

    cfg = {**_cfg(tmp_path, store), "output_dir": str(tmp_path / "pre")}
    pre = make_tracker(cfg, rank=0)
    pre.start(cfg)
    source = pre.register(export(tmp_path / "pre_export"), "vit-pre", step=1)
    pre.end()
    assert source is not None and source.stored_aliases == () and "@latest resolves to it" in source.describe()

    cfg = {**_cfg(tmp_path, store), "output_dir": str(tmp_path / "ft"),
           "finetune": {"source": "models:/vit-pre@latest"}}
    ft = make_tracker(cfg, rank=0)
    ft.start(cfg)  # no tags from a trainer: the tracker resolves @latest itself
    version = ft.register(export(tmp_path / "ft_export"), "vit-ft", step=2)
    ft.end()
    client = MlflowClient(store)
    mv = client.get_model_version("vit-ft", version.version)
    assert mv.run_id == ft.run_id  # MLflow's own link: the version's source run
    assert {"finetune.source_uri": "models:/vit-pre@latest", "finetune.source_model": "vit-pre",
            "finetune.source_version": source.version, "finetune.source_run_id": pre.run_id}.items() <= mv.tags.items()
    exp_id = client.get_run(pre.run_id).info.experiment_id
    links = (f"(#/models/vit-pre/versions/{source.version})", f"(#/experiments/{exp_id}/runs/{pre.run_id})")
    assert all(link in mv.description for link in links)
    note = client.get_run(ft.run_id).data.tags["mlflow.note.content"]  # the run page's Description
    assert all(link in note for link in links)
