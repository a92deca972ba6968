"""benchmarks/bench_gpu.py: on a machine without CUDA it claims nothing; its code path runs (--smoke)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_without_cuda_it_says_so_and_measures_nothing(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path / "out.json"))
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_smoke_run_exercises_the_measurement_path(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = _run("--smoke", "--micro", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["models"]["vit_ti16"]
    assert "error" not in rows, rows
    for variant in ("eager", "eager+AC"):
        assert rows[variant]["images_per_s"] > 0 and rows[variant]["loss"] > 0
    assert result["input_pipeline"]["rows"][0]["images_per_s"] > 0
    assert "not a GPU figure" in result["device"]
