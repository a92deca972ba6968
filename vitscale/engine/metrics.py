"""Throughput, MFU and memory for the training log, and the metrics.jsonl writer.

MFU follows the PaLM convention: achieved model FLOP/s (analytic forward FLOPs x 3 for forward +
backward, activation recomputation not counted) over the device's peak. The peak comes from a table
of known GPUs (dense bf16/fp16 tensor-core numbers) or, on CPU, from a one-off matmul probe, so the
number is meaningful on every machine the tests run on.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

def matmul_probe_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul on the current CPU threads (best of ``repeats``)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first call pays for allocation and thread start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    """Per-device peak for MFU: vitscale.hardware's GPU table, or a CPU matmul probe.

    An unknown GPU gets 0.0 (MFU is then logged as 0) and one warning naming ``trainer.peak_flops``.
    """
    if device.type == "cuda":
        from vitscale.hardware import match_device_name

        name = torch.cuda.get_device_name(device)
        gpu = match_device_name(name)
        if gpu is None or not gpu.peak(precision):
            log.warning("MFU: %r is not in vitscale.hardware's table (%s peak unknown); MFU is logged as 0 "
                        "until you set trainer.peak_flops=<dense FLOP/s per device>", name, precision)
            return 0.0
        return gpu.peak(precision)
    return matmul_probe_flops(torch.bfloat16 if precision == "bf16" else torch.float32)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class StepTimer:
    """Wall time, data wait and images between two log lines.

    The window's wall time is measured between read-backs of the loop's device statistics, which
    wait for the device on CUDA; so no per-step synchronisation is needed for exact throughput.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new window now (after an evaluation or a checkpoint, which are not training time)."""
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.images = 0
        self.steps = 0

    def add(self, data_s: float, images: int) -> None:
        self.data_s += data_s
        self.images += images
        self.steps += 1

    def summary(self, *, world_size: int, tokens_per_image: int, flops_per_image: float,
                peak: float, now: float | None = None) -> dict[str, float]:
        """Global throughput (every rank processes ``images`` per step) and MFU for the window."""
        wall = max((time.perf_counter() if now is None else now) - self.start, 1e-9)
        images_per_s = self.images * world_size / wall
        achieved = 3.0 * flops_per_image * self.images / wall  # per device
        steps = max(self.steps, 1)
        out = {
            "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * tokens_per_image,
            "data_wait_s": self.data_s / steps,
            "compute_s": max(wall - self.data_s, 0.0) / steps,
            "mfu": achieved / peak if peak > 0 else 0.0,
        }
        self.restart()
        return out


class MetricsWriter:
    """Appends one JSON object per logged step to ``output_dir/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def progress_line(record: dict[str, Any], max_steps: int) -> str:
    """One console line per log step, what timm and torchtitan users expect to see scroll by."""
    step_s = record.get("data_wait_s", 0.0) + record.get("compute_s", 0.0)
    eta_s = max(max_steps - int(record["step"]), 0) * step_s
    hours, rest = divmod(int(round(eta_s)), 3600)
    data_share = record.get("data_wait_s", 0.0) / step_s if step_s > 0 else 0.0
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record.get('images_per_s', 0.0):,.0f} img/s | MFU {100 * record.get('mfu', 0.0):.1f}% | "
            f"data wait {100 * data_share:.0f}% | mem {record.get('peak_mem', 0) / 2**30:.2f} GiB | "
            f"ETA {hours}:{rest // 60:02d}:{rest % 60:02d}")

