"""GPU acceptance benchmark: what one GPU does with vitscale's real training step, and what its CPU feeds.

On CUDA, for ViT-B/16 at 224 px (and ViT-L/16, ViT-H/14 when they fit), in bf16 under DeepSpeed ZeRO-2
on one rank, each through the Trainer's own set-up and ``train_step`` on in-memory batches:
  - images/s per GPU and MFU against the device's peak (vitscale.hardware's table or --peak-tflops),
  - peak memory, the SDPA backend the attention actually runs (flash / memory-efficient / cudnn / math),
  - compile (trainer.compile=blocks) on vs off, activation checkpointing (torch, every block) on vs off,
  - the largest micro-batch that fits (doubling until out-of-memory, eager, AC off and on).
Then the input pipeline on this machine's CPU cores: the WebDataset training stream at 224 px
(real ImageNet JPEGs from foolbox, sharded by data_tools) with N loader workers, images/s, so a
reader sees how many cores one GPU needs.

Writes ``--out`` (JSON) and prints a table. Without CUDA it says so and exits 0, claiming nothing.

    python benchmarks/bench_gpu.py [--models vit_b16 vit_l16 vit_h14] [--steps 20] [--out bench_gpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


def sdpa_backend(dim: int, heads: int, tokens: int, dtype: torch.dtype) -> str:
    """The first backend, in PyTorch's dispatch priority, that accepts this attention shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, heads, tokens, dim // heads, device="cuda", dtype=dtype, requires_grad=True)
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn"),
                          (SDPBackend.EFFICIENT_ATTENTION, "memory-efficient"), (SDPBackend.MATH, "math")):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
            return name
        except RuntimeError:
            continue
    return "none"


SMOKE = ["model.img_size=32", "model.patch_size=8", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
         "trainer.precision=fp32", "trainer.peak_flops=1e11"]  # --smoke: the code path on CPU, tiny


def make_trainer(model: str, micro: int, *, compile_mode: str, ac: str, extra: list[str]) -> Any:
    """A Trainer built exactly as train.py builds it (one rank, ZeRO-2, bf16), fed synthetic batches."""
    from hydra import compose, initialize_config_dir

    from vitscale.config import resolve_model
    from vitscale.start import build_trainer

    overrides = [f"model={model}", "data=imagenet", "data.num_classes=1000", "deepspeed=zero2",
                 f"trainer.global_batch_size={micro}", f"trainer.micro_batch_size={micro}",
                 "trainer.precision=bf16", f"trainer.compile={compile_mode}",
                 f"trainer.activation_checkpointing.policy={ac}", "tracking.enabled=false",
                 "output_dir=/tmp/vitscale-bench-gpu", "data.train_shards=synthetic", "data.val_shards=null",
                 "resume=null", *extra]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    size = resolve_model(cfg).img_hw
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    images = torch.randn(micro, 3, *size, device=device)
    labels = torch.randint(0, 1000, (micro,), device=device)

    def batches():
        while True:
            yield {"image": images, "label": labels}

    return build_trainer(cfg, batches=batches())


def measure_step(model: str, micro: int, steps: int, *, compile_mode: str, ac: str,
                 extra: list[str] = ()) -> dict[str, Any]:
    """images/s, MFU and peak memory of ``steps`` timed steps after warm-up (compile included there)."""
    from vitscale.engine.loop import WindowStats, train_step
    from vitscale.engine.metrics import StepTimer, peak_memory_bytes

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(model, micro, compile_mode=compile_mode, ac=ac, extra=list(extra))
    try:
        stream, timer, stats = trainer.batches, StepTimer(), WindowStats(trainer.dist.device)
        trainer.engine.train()
        for _ in range(3):  # warm-up: compile, allocator, DeepSpeed's first-step buffers
            train_step(trainer, stream, timer, stats)
        stats.read()  # waits for the device
        start = time.perf_counter()
        for _ in range(steps):
            train_step(trainer, stream, timer, stats)
        loss = stats.read()["loss"]  # one read-back: waits for the device
        seconds = time.perf_counter() - start
        rate = micro * steps / seconds
        return {"images_per_s": rate, "mfu": 3 * trainer.flops_per_image * rate / trainer.peak if trainer.peak else None,
                "peak_mem_gb": peak_memory_bytes(trainer.dist.device) / 1e9, "loss": loss, "step_s": seconds / steps}
    finally:
        getattr(trainer.engine, "destroy", lambda: None)()
        del trainer
        if cuda:
            torch.cuda.empty_cache()


def largest_micro_batch(model: str, ac: str, start: int) -> int:
    """Double the micro-batch until a step runs out of memory; the last that ran."""
    best, micro = 0, start
    while micro <= 4096:
        try:
            measure_step(model, micro, 1, compile_mode="none", ac=ac)
            best, micro = micro, micro * 2
        except torch.OutOfMemoryError:
            break
    torch.cuda.empty_cache()
    return best


def input_pipeline(workers: list[int], batches: int, copies: int = 25) -> list[dict[str, Any]]:
    """The training stream at 224 px with N DataLoader workers (real JPEGs, crop + flip + normalise)."""
    import shutil
    import tempfile

    from bench_shard import foolbox_jpegs
    from data_tools.shard import main as shard_main
    from vitscale.data import build_train_loader

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_stream_") as tmp:
        src, out = Path(tmp) / "src" / "imagenet", Path(tmp) / "shards"
        src.mkdir(parents=True)
        for c in range(copies):
            for j in foolbox_jpegs():
                shutil.copyfile(j, src / f"c{c:03d}_{j.name}")
        assert shard_main(["--src", str(src.parent), "--out", str(out), "--no-progress",
                           "--samples-per-shard", "25"]) == 0
        urls = sorted(str(u) for u in out.glob("*.tar"))
        for n in workers:
            cfg = {"train_shards": urls, "num_classes": 1, "num_workers": n, "shuffle_buffer": 100,
                   "mean": [0.5] * 3, "std": [0.5] * 3,
                   "augment": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": True}}
            loader = build_train_loader(cfg, batch_size=64, rank=0, world_size=1, seed=0, img_size=224, in_chans=3)
            it = iter(loader)
            for _ in range(max(n, 1) * 2):
                next(it)  # every worker has opened its first shard
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            rate = 64 * batches / (time.perf_counter() - start)
            getattr(loader, "close", lambda: None)()
            rows.append({"workers": n, "images_per_s": rate})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16", "vit_h14"])
    parser.add_argument("--micro", type=int, default=64, help="micro-batch for the speed rows")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--stream-batches", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-max-batch", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="run the code path on CPU with a tiny model (a test of this script, not a figure)")
    args = parser.parse_args()
    extra: list[str] = []
    if args.smoke:
        extra, args.models, args.steps, args.stream_batches = SMOKE, ["vit_ti16"], 2, 2
        args.skip_compile = args.skip_max_batch = True
        args.workers = args.workers or [0]
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine; nothing measured, nothing claimed.")
        return 0
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run: not a GPU figure)"
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "models": {}}
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for model in args.models:
        rows: dict[str, Any] = {}
        try:
            from vitscale.models import create_model

            with torch.device("meta"):
                m = create_model(model)
            if torch.cuda.is_available():
                rows["sdpa_backend"] = sdpa_backend(m.cfg.embed_dim, m.cfg.num_heads,
                                                    m.grid_size[0] * m.grid_size[1] + 1, torch.bfloat16)
            variants = [("eager", "none", "none"), ("eager+AC", "none", "torch")]
            if not args.skip_compile:
                variants += [("compile", "blocks", "none"), ("compile+AC", "blocks", "torch")]
            for name, mode, ac in variants:
                try:
                    rows[name] = measure_step(model, args.micro, args.steps, compile_mode=mode, ac=ac, extra=extra)
                except torch.OutOfMemoryError:
                    rows[name] = {"error": f"out of memory at micro-batch {args.micro}"}
            if not args.skip_max_batch:
                rows["max_micro_batch"] = {"AC off": largest_micro_batch(model, "none", 16),
                                           "AC on": largest_micro_batch(model, "torch", 16)}
        except Exception as exc:  # noqa: BLE001 - one model failing must not hide the others' figures
            rows["error"] = f"{type(exc).__name__}: {exc}"
        result["models"][model] = rows
        print(json.dumps({model: rows}, indent=1, default=str), flush=True)
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or sorted({1, 2, 4, min(8, cores), cores})
    result["input_pipeline"] = {"cores": cores, "rows": input_pipeline(workers, args.stream_batches,
                                                                       copies=1 if args.smoke else 25)}
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{'model':8s} {'variant':11s} {'img/s':>8s} {'MFU':>6s} {'peak GB':>8s}   SDPA")
    for model, rows in result["models"].items():
        for name in ("eager", "eager+AC", "compile", "compile+AC"):
            r = rows.get(name)
            if isinstance(r, dict) and "images_per_s" in r:
                mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
                print(f"{model:8s} {name:11s} {r['images_per_s']:8.1f} {mfu:>6s} {r['peak_mem_gb']:8.1f}   "
                      f"{rows.get('sdpa_backend')}")
            elif r is not None:
                print(f"{model:8s} {name:11s} {r}")
        if "max_micro_batch" in rows:
            print(f"{model:8s} largest micro-batch: {rows['max_micro_batch']}")
    for row in result["input_pipeline"]["rows"]:
        print(f"input pipeline, 224 px, {row['workers']:2d} workers: {row['images_per_s']:7.0f} images/s "
              f"({cores} cores)")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
