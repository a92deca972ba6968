"""Training-step throughput: vitscale's Trainer step under DeepSpeed (one rank) vs. timm in plain torch,
and with ``--compile`` vitscale compiled (trainer.compile) beside both.

Both sides train the same architecture (vitscale's ViT and timm's VisionTransformer with the same
width, depth, heads, patch and image size) with the same batch, AdamW, clipping at norm 1 and the same
torch thread count, on in-memory batches so the input pipeline is out of the picture. The two are
timed in alternating rounds within one run (the machine may be shared) and their fastest single step (the least-disturbed sample of each; medians are printed
too). Goals: eager vitscale / eager timm >= 0.95; compiled vitscale / eager timm >= 1.2.

    python benchmarks/bench_train_step.py [--batch 32] [--rounds 5] [--steps 5] [--zero 0] [--compile blocks]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARCH = dict(img_size=64, patch_size=8, in_chans=3, embed_dim=192, depth=6, num_heads=3, num_classes=100)


def vitscale_step(batch: int, zero: int, compile_mode: str = "none") -> Callable[[], None]:
    """One Trainer step (vitscale.engine.loop.train_step) on a DeepSpeed engine of one rank."""
    from hydra import compose, initialize_config_dir

    from vitscale.engine.loop import WindowStats, train_step
    from vitscale.engine.metrics import StepTimer
    from vitscale.start import build_trainer

    overrides = [f"model.{k}={v}" for k, v in ARCH.items() if k != "num_classes"]
    overrides += [
        "model=vit_ti16", f"data.num_classes={ARCH['num_classes']}", f"deepspeed=zero{zero}",
        f"trainer.global_batch_size={batch}", f"trainer.micro_batch_size={batch}", "trainer.precision=fp32",
        "optim=adam_pretrain", "optim.lr=1e-4", "optim.schedule.name=constant", "tracking.enabled=false",
        "trainer.peak_flops=1", "output_dir=/tmp/vitscale-bench", f"trainer.compile={compile_mode}",
        "data.train_shards=synthetic", "data.val_shards=null", "resume=null",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    images = torch.randn(batch, ARCH["in_chans"], ARCH["img_size"], ARCH["img_size"])
    labels = torch.randint(0, ARCH["num_classes"], (batch,))

    def batches():
        while True:
            yield {"image": images, "label": labels}

    trainer = build_trainer(cfg, batches=batches())  # the Trainer the loop runs, fed synthetic batches
    timer, stats = StepTimer(), WindowStats(trainer.dist.device)
    trainer.engine.train()
    return lambda: train_step(trainer, trainer.batches, timer, stats)


def timm_step(batch: int) -> Callable[[], None]:
    """The same architecture as timm's VisionTransformer, trained by a plain torch loop."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**ARCH, global_pool="token", class_token=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    images = torch.randn(batch, ARCH["in_chans"], ARCH["img_size"], ARCH["img_size"])
    labels = torch.randint(0, ARCH["num_classes"], (batch,))
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product", "aten::linear",
              "aten::matmul", "aten::baddbmm", "mkldnn")


def profile_split(step: Callable[[], None], steps: int = 3) -> tuple[float, list[tuple[str, float]]]:
    """Share of CPU self-time spent in matrix multiplies, and the top ops: what compile cannot fuse away.

    Inductor on CPU fuses element-wise work (GELU, LayerNorm, softmax, adds) but calls the same GEMM
    kernels (oneDNN / MKL), so 1 / (matmul share) bounds what compiling can gain (Amdahl)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows) or 1.0
    matmul = sum(t for k, t in rows if k.startswith(MATMUL_OPS))
    top = sorted(rows, key=lambda r: -r[1])[:8]
    return matmul / total, [(k, t / total) for k, t in top]


def step_times(step: Callable[[], None], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", default=None, choices=("blocks", "model"),
                        help="also time vitscale with trainer.compile=MODE (inductor)")
    parser.add_argument("--profile", action="store_true",
                        help="print each variant's matmul share of CPU time (the bound on compile's gain)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {"vitscale": vitscale_step(args.batch, args.zero), "timm": timm_step(args.batch)}
    if args.compile:
        steps["compiled"] = vitscale_step(args.batch, args.zero, args.compile)
    for step in steps.values():  # warm-up: allocator, thread pool, DeepSpeed's first step, compilation
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name] += step_times(step, args.steps)
    print(f"model: ViT {ARCH} | batch {args.batch} | threads {args.threads} | ZeRO-{args.zero} | fp32 CPU")
    best = {}
    labels = {"vitscale": "vitscale eager (Trainer step, DeepSpeed, 1 rank)",
              "timm": "timm VisionTransformer eager, plain torch loop  ",
              "compiled": f"vitscale trainer.compile={args.compile} (inductor)      "}
    for name in steps:
        best[name] = args.batch / min(times[name])
        median = args.batch / statistics.median(times[name])
        print(f"{labels[name]}: {best[name]:7.1f} images/s best step, {median:7.1f} median of {len(times[name])}")
    print(f"ratio vitscale eager / timm eager (best steps): {best['vitscale'] / best['timm']:.3f} (goal >= 0.95)")
    if args.compile:
        print(f"ratio vitscale compiled / timm eager (best steps): {best['compiled'] / best['timm']:.3f} "
              f"(goal >= 1.2)")
    if args.profile:
        for name, step in steps.items():
            share, top = profile_split(step)
            print(f"profile {name}: matrix multiplies {100 * share:.0f} % of CPU self-time -> compiling can gain "
                  f"at most {1 / max(share, 1e-9):.2f}x; top ops: "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in top[:6]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
