"""Tracking with the MLflow server down: resolution fails in seconds with one line naming the server
(or reuses this machine's earlier resolution, saying so), and a registration that could not be sent
is written to a file together with the command that completes it."""
from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from test_tracking import _cfg, _free_port, _start_server, _stop_server  # tests/ is on sys.path
from vitscale.tracking import TrackingUnreachable, make_tracker, resolve_resume, resolve_weights
from vitscale.tracking.reach import RETRIES_VAR, TIMEOUT_VAR


@pytest.fixture(autouse=True)
def mlflow_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MLflow's own HTTP defaults (7 retries, 120 s), as a user's shell has them: the ~4 minute hang."""
    monkeypatch.delenv(RETRIES_VAR, raising=False)
    monkeypatch.delenv(TIMEOUT_VAR, raising=False)
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server, a black-holing proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def _assert_one_line(text: str, server: str) -> None:
    assert server in text and "\n" not in text and len(text) < 400, text


def test_models_uri_with_the_server_down_fails_in_seconds(caplog: pytest.LogCaptureFixture) -> None:
    server = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnreachable) as err:
        resolve_weights("models:/vit@best", tracking_uri=server)
    assert time.monotonic() - start < 10
    _assert_one_line(str(err.value), server)
    assert "connection refused" in str(err.value) and "no earlier resolution is cached" in str(err.value)
    assert RETRIES_VAR not in os.environ and TIMEOUT_VAR not in os.environ  # the caller's env is restored


def test_a_server_that_never_answers_times_out(silent_port: int) -> None:
    server = f"http://127.0.0.1:{silent_port}"
    start = time.monotonic()
    with pytest.raises(TrackingUnreachable, match="timed out, 2s timeout") as err:
        resolve_weights("models:/vit/3", tracking_uri=server, timeout_s=2)
    assert time.monotonic() - start < 10
    _assert_one_line(str(err.value), server)


def test_fine_tune_model_build_fails_fast(tmp_path: Path) -> None:
    """The path a run takes: vitscale.start resolving finetune.source."""
    from ckpt_engine import tiny_cfg
    from vitscale.start import model_for

    server = f"http://127.0.0.1:{_free_port()}"
    cfg = tiny_cfg(tmp_path, 2, "finetune.source=models:/vit-demo@best", f"tracking.uri={server}")
    start = time.monotonic()
    with pytest.raises(TrackingUnreachable) as err:
        model_for(cfg)
    assert time.monotonic() - start < 10
    _assert_one_line(str(err.value), server)


def test_resume_from_a_run_with_the_server_down_fails_fast() -> None:
    server = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnreachable, match="resume=runs:/0123abcd") as err:
        resolve_resume("runs:/0123abcd", tracking_uri=server)
    assert time.monotonic() - start < 10
    _assert_one_line(str(err.value), server)


def _export(path: Path, payload: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "model_config.json").write_text("{}")
    return path


@pytest.mark.slow
def test_cached_resolution_and_unsent_registration_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(port, tmp_path)
    try:
        cfg = _cfg(tmp_path, uri, retries=1, retry_interval_s=0.2, flush_interval_s=0)
        del cfg["tracking"]["artifact_dir"]
        first = make_tracker(cfg, 0)
        first.start(cfg)
        assert first.register(_export(tmp_path / "e1", b"v1"), "vit", step=1, metrics={"eval/top1": 0.5},
                              best_metric="eval/top1") is not None
        first.end()
        fresh = resolve_weights("models:/vit@best", tracking_uri=uri)
        assert fresh.version == "1" and fresh.cached_at is None
        _stop_server(server)

        # Server down: the fine-tune source comes from this machine's earlier resolution, with a warning.
        with caplog.at_level(logging.WARNING, logger="vitscale.tracking"):
            cached = resolve_weights("models:/vit@best", tracking_uri=uri)
        assert cached.path == fresh.path and cached.version == "1" and cached.cached_at
        assert cached.lineage_tags()["finetune.source_cached_at"] == cached.cached_at
        [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert uri in line and "using the copy of models:/vit@best resolved on" in line and "version 1" in line

        # Server down for a whole job: its registration is written out with the command, not dropped.
        out = tmp_path / "job2"
        cfg2 = _cfg(tmp_path, uri, retries=1, retry_interval_s=0.2, flush_interval_s=0) | {"output_dir": str(out)}
        del cfg2["tracking"]["artifact_dir"]
        monkeypatch.setenv(RETRIES_VAR, "0")
        second = make_tracker(cfg2, 0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vitscale.tracking"):
            second.start(cfg2)
            assert second.register(_export(tmp_path / "e2", b"v2"), "vit", step=2, metrics={"eval/top1": 0.9},
                                   best_metric="eval/top1", aliases=["candidate"]) is None
            second.end()
        lines = (out / "tracking" / "unsent_registrations.jsonl").read_text().splitlines()
        [record] = [json.loads(x) for x in lines]
        assert record["name"] == "vit" and record["aliases"] == ["candidate"] and record["tracking_uri"] == uri
        assert record["command"] in caplog.text and "1 model registration(s)" in caplog.text

        server = _start_server(port, tmp_path)
        done = subprocess.run(shlex.split(record["command"]), capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "registered models:/vit/2" in done.stdout
        assert not (out / "tracking" / "unsent_registrations.jsonl").exists()
        client = MlflowClient(uri, registry_uri=uri)
        assert client.get_model_version_by_alias("vit", "best").version == "2"
        assert client.get_model_version_by_alias("vit", "candidate").version == "2"
    finally:
        _stop_server(server)
