"""End-to-end training throughput on CPU ranks: a plain in-memory torch loop vs vitscale, one run.

Baseline (this process): a ~40-line plain-torch ViT (width 96, depth 4, 3 heads, patch 7, 28 px,
Fashion-MNIST held in memory as tensors), AdamW + one-cycle, random shift (+-2 px) and horizontal
flip, clipping at norm 1, batch 128, fp32, 2 torch threads: the best a user gets without a framework.

vitscale (a child process tree): `deepspeed --num_gpus 2 vitscale/train.py` on the same architecture,
image size, global batch (2 ranks x 64) and precision, reading the WebDataset shards written by
`data_tools.shard` through the framework's stream (decode, crop, flip in loader workers). The
bench sets no OMP_NUM_THREADS for it: how cores are split between ranks and workers is the
framework's decision (vitscale.cpu_threads), whose "CPU threads: ..." line is printed when the
run logs it. It runs ZeRO-0, the like-for-like setting: the plain loop keeps whole gradients and
optimizer state in its one process, as every ZeRO-0 rank does. ZeRO-2 (`-- deepspeed=zero2`, what
the demo uses to show sharding) adds a parameter all-gather and a partitioned gradient-norm
collective per step, which on this 0.46M-parameter model buy nothing and cost 11-15 % img/s
(measured: 2,129 vs 2,390-2,508 img/s median).

Context line: plain-torch DDP with the same 2 ranks x 1 thread (gloo, in-memory data, one run of
the same length) shows what the rank layout itself costs, apart from the framework. It is also the
steadier baseline: the 2-thread plain loop is bimodal on the 2-core machine (medians ~2,200 or
~2,670 img/s in runs minutes apart), so read the ratio against both.

Rounds alternate (plain, vitscale, plain, ...) so that both see the same neighbours on a shared
machine; the load average is printed beside every round. Throughput is the median over windows of
10 optimizer steps after a warm-up (vitscale: its metrics.jsonl windows; plain: the same windows
timed here); data wait is vitscale's data_wait_s share of its step time over the same windows.
Goals: vitscale / plain >= 0.9, data wait < 2 %.

Last, the input work is timed in CPU ms per image on one thread (robust under load, unlike wall
time): vitscale's loader-worker stream vs the plain loop's shift/flip. On 2 cores every worker
millisecond is taken from the ranks, so this line bounds the ratio whatever the thread split.

A shared machine hurts the baseline most: its 2-thread OpenMP team spin-waits at every barrier for a
thread that a neighbour's process has preempted (measured here at load 7 on 2 cores: 2 threads gave
~40 img/s, 1 thread ~300). Compare figures taken at a low load average only.

    .venv/bin/python benchmarks/bench_e2e.py [--rounds 2] [--steps 300] [--work /tmp/vitscale-bench-e2e]
        [--fmnist /usr/share/datasets/fashion-mnist] [-- extra Hydra overrides for the vitscale run]
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WIDTH, DEPTH, HEADS, PATCH, IMG = 96, 4, 3, 7, 28
WINDOW = 10  # optimizer steps per throughput window, both sides


# ---- the plain-torch baseline ------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.n1, self.n2 = heads, nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.n2(x))


class PlainViT(nn.Module):
    def __init__(self, d: int = WIDTH, depth: int = DEPTH, heads: int = HEADS, patch: int = PATCH,
                 img: int = IMG, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def load_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (zero fill) and horizontal flip, per sample."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, n), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + IMG, dx[i]:dx[i] + IMG] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class PlainLoop:
    """The baseline's state across rounds: model, optimizer, schedule and data order continue."""

    def __init__(self, fmnist: Path, batch: int, total_steps: int) -> None:
        images = torch.from_numpy(load_idx(fmnist / "train-images-idx3-ubyte.gz").copy())
        self.x = ((images.float() / 255.0 - 0.2860) / 0.3530).unsqueeze(1)
        self.y = torch.from_numpy(load_idx(fmnist / "train-labels-idx1-ubyte.gz").astype(np.int64))
        self.batch, self.gen = batch, torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = PlainViT()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=2e-3, total_steps=total_steps)
        self.order, self.pos = torch.randperm(len(self.x), generator=self.gen), 0

    def step(self) -> None:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        loss = F.cross_entropy(self.model(shift_flip(self.x[idx], self.gen)), self.y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def windows(self, steps: int) -> list[float]:
        """images/s of each window of WINDOW steps."""
        self.model.train()
        rates = []
        for _ in range(steps // WINDOW):
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                self.step()
            rates.append(WINDOW * self.batch / (time.perf_counter() - t0))
        return rates


def _ddp_rank(rank: int, world: int, port: int, fmnist: Path, batch: int, steps: int, warmup: int,
              out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loop = PlainLoop(fmnist, batch // world, total_steps=steps + warmup + 10)
    loop.gen.manual_seed(rank)  # each rank its own batches
    loop.model = torch.nn.parallel.DistributedDataParallel(loop.model)  # same parameters: the loop's optimizer stays
    loop.windows(warmup)
    rates = loop.windows(steps)
    if rank == 0:
        out["rates"] = [world * r for r in rates]  # global images/s
    dist.destroy_process_group()


def plain_ddp(fmnist: Path, batch: int, nproc: int, steps: int, warmup: int) -> list[float]:
    """The plain loop as `nproc` DDP ranks x 1 thread (gloo): images/s of each window."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_rank, args=(nproc, port, fmnist, batch, steps, warmup, out), nprocs=nproc)
        return list(out["rates"])


# ---- vitscale ----------------------------------------------------------------------------------
def write_shards(fmnist: Path, out: Path) -> str:
    """Shards from data_tools.shard (resumable: a finished folder is reused); returns the brace pattern."""
    from data_tools.shard import main as shard_main

    if shard_main(["--src", str(fmnist / "train-images-idx3-ubyte.gz"), "--out", str(out), "--prefix", "fmnist-train",
                   "--samples-per-shard", "5000", "--workers", "2", "--no-progress"]) != 0:
        raise SystemExit(f"sharding {fmnist} failed")
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    return str(out / next(iter(splits.values()))["pattern"])


def vitscale_round(pattern: str, work: Path, r: int, steps: int, batch: int, nproc: int, precision: str,
                   extra: list[str]) -> tuple[list[dict], list[str]]:
    """One `deepspeed` launch; returns its metrics.jsonl records and its "CPU threads" log lines."""
    out = work / f"vitscale_round{r}"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    cmd = [str(REPO / ".venv/bin/deepspeed"), "--num_gpus", str(nproc), str(REPO / "vitscale/train.py"),
           "+experiment=demo_pretrain", "model=vit_demo", f"model.img_size={IMG}", f"model.patch_size={PATCH}",
           f"model.embed_dim={WIDTH}", f"model.depth={DEPTH}", f"model.num_heads={HEADS}",
           f"trainer.precision={precision}", f"trainer.global_batch_size={batch}",
           f"trainer.micro_batch_size={batch // nproc}", f"trainer.max_steps={steps}", f"trainer.log_every={WINDOW}",
           "trainer.checkpoint_every=0", "trainer.export_at_end=false", "trainer.peak_flops=1", "deepspeed=zero0",
           "tracking.enabled=false", "eval.every=0", "resume=null", f"data.train_shards='{pattern}'",
           "data.val_shards=null", f"output_dir={out}", *extra]
    log_path = work / f"vitscale_round{r}.log"
    with log_path.open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text(errors="replace")
    if rc != 0:
        print(text[-4000:])
        raise SystemExit(f"vitscale round {r} failed (rc {rc}); log: {log_path}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    threads = sorted({line[line.index("CPU threads:"):].strip() for line in text.splitlines() if "CPU threads:" in line})
    return records, threads


def input_cpu_ms(pattern: str, plain: PlainLoop, batch: int, batches: int = 40) -> tuple[float, float]:
    """CPU ms per image of the input work on one thread (robust on a shared machine, unlike wall
    time): vitscale's loader-worker stream (read, decode, crop, flip, batch) vs the plain loop's
    in-memory shift/flip."""
    from omegaconf import OmegaConf

    from vitscale.data import build_train_loader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs/data/fashion_mnist.yaml"))
        cfg.update(train_shards=pattern, num_workers=0)
        loader = build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=0, img_size=IMG, in_chans=1)
        stream = iter(loader.worker_dataset())
        next(stream)
        t0 = time.process_time()
        for _ in range(batches):
            next(stream)
        stream_ms = 1000 * (time.process_time() - t0) / (batches * batch)
        t0 = time.process_time()
        for _ in range(batches):
            shift_flip(plain.x[:batch], plain.gen)
        return stream_ms, 1000 * (time.process_time() - t0) / (batches * batch)
    finally:
        torch.set_num_threads(threads)


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (plain, vitscale) x N")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per round, each side")
    p.add_argument("--warmup", type=int, default=30, help="steps per round not counted (vitscale: start-up, first shard)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    p.add_argument("--nproc", type=int, default=2, help="vitscale ranks")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--fmnist", type=Path, default=Path(os.environ.get("FASHION_MNIST_DIR",
                                                                       "/usr/share/datasets/fashion-mnist")))
    p.add_argument("--work", type=Path, default=Path("/tmp/vitscale-bench-e2e"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the vitscale run (after --)")
    args = p.parse_args()
    if args.precision != "fp32":
        raise SystemExit("the plain loop is fp32 here; compare bf16 with bench_train_step instead")
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"start: {load()} on {os.cpu_count()} CPUs")
    pattern = write_shards(args.fmnist, args.work / "shards")
    torch.set_num_threads(args.threads)
    plain = PlainLoop(args.fmnist, args.batch, total_steps=args.rounds * (args.steps + args.warmup) + 10)
    for _ in range(5):
        plain.step()  # allocator and thread pool warm-up
    skip = math.ceil(args.warmup / WINDOW)
    rates: dict[str, list[float]] = {"plain": [], "vitscale": []}
    wait_s = step_s = 0.0
    threads: set[str] = set()
    for r in range(args.rounds):
        plain.windows(args.warmup)
        got = plain.windows(args.steps)
        rates["plain"] += got
        print(f"round {r + 1} plain    : {statistics.median(got):7.0f} img/s median of {len(got)} windows | {load()}")
        records, lines = vitscale_round(pattern, args.work, r, args.steps + args.warmup, args.batch, args.nproc,
                                        args.precision, args.overrides)
        threads.update(lines)
        used = records[skip:]
        rates["vitscale"] += [rec["images_per_s"] for rec in used]
        wait_s += sum(rec["data_wait_s"] for rec in used)
        step_s += sum(rec["data_wait_s"] + rec["compute_s"] for rec in used)
        share = sum(x["data_wait_s"] for x in used) / max(sum(x["data_wait_s"] + x["compute_s"] for x in used), 1e-9)
        print(f"round {r + 1} vitscale : {statistics.median(rec['images_per_s'] for rec in used):7.0f} img/s median "
              f"of {len(used)} windows, data wait {100 * share:.1f} % | {load()}")
    ddp = plain_ddp(args.fmnist, args.batch, args.nproc, args.steps, args.warmup)
    print(f"plain DDP {args.nproc} ranks : {statistics.median(ddp):7.0f} img/s median of {len(ddp)} windows | {load()}")
    plain_med, vit_med = statistics.median(rates["plain"]), statistics.median(rates["vitscale"])
    print(f"\nmodel: ViT width {WIDTH}, depth {DEPTH}, patch {PATCH}, {IMG} px | global batch {args.batch} | "
          f"{args.precision} | {args.rounds} alternating rounds x {args.steps} steps (+{args.warmup} warm-up)")
    print(f"plain torch, in-memory, {args.threads} threads          : {plain_med:7.0f} img/s median "
          f"(best window {max(rates['plain']):.0f})")
    zero = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("deepspeed=")), "zero0")
    print(f"vitscale, {zero}, {args.nproc} ranks, shard stream    : {vit_med:7.0f} img/s median "
          f"(best window {max(rates['vitscale']):.0f})")
    for line in sorted(threads) or ["(no 'CPU threads:' line logged by the run)"]:
        print(f"vitscale thread split (logged)           : {line}")
    print(f"ratio vitscale / plain (medians)         : {vit_med / plain_med:.3f} (goal >= 0.9)")
    ddp_med = statistics.median(ddp)
    print(f"context: plain DDP, {args.nproc} ranks x 1 thread : {ddp_med:7.0f} img/s median, {ddp_med / plain_med:.3f} of "
          f"plain; vitscale / plain DDP {vit_med / ddp_med:.3f}")
    print(f"vitscale data wait share of step time    : {100 * wait_s / max(step_s, 1e-9):.2f} % (goal < 2 %)")
    stream_ms, plain_ms = input_cpu_ms(pattern, plain, args.batch // args.nproc)
    print(f"input CPU per image, 1 thread            : vitscale loader worker {stream_ms:.3f} ms, plain shift/flip "
          f"{plain_ms:.3f} ms; at the plain loop's median rate the workers need "
          f"{stream_ms * plain_med / 1000:.2f} of the {os.cpu_count()} cores")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
