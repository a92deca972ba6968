"""Validate the planner (`python -m vitscale.plan`) against what actually happens, on CPU.

    .venv/bin/python benchmarks/validate_plan.py            # all four checks, one table
    .venv/bin/python benchmarks/validate_plan.py --only activations,compute,zero3_cold
    .venv/bin/python benchmarks/validate_plan.py --json out.json

(a) model-state bytes per rank: the planner vs the tensors DeepSpeed 0.19 really allocates on 2 gloo
    ranks (ZeRO 0-3 x fp32/bf16; every live tensor storage counted once, after an optimizer step
    and again at the end of the next backward, when gradients and reduce buckets exist) - 2 %.
(b) activation bytes per micro-batch: the planner vs the bytes autograd saves for backward
    (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, parameters excluded) plus
    the block inputs that checkpointed blocks keep - 10 %.
(c) ViT-H/14 model states vs deepspeed's estimate_zero3_model_states_mem_needs_all_cold.
(d) pre-training compute of the paper's JFT runs vs Table 6 of arXiv 2010.11929 - 3 %.

The 2-rank part starts itself with torchrun (`--zero-worker` is that worker's entry point).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A model big enough that ZeRO-3 partitions some parameters (> stage3_param_persistence_threshold
# = 1e5 elements: qkv, fc1, fc2) and keeps others whole (proj, norms, biases), small enough for CPU.
ZERO_MODEL = ["model=vit_ti16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=192",
              "model.depth=2", "model.num_heads=3", "data=imagenet", "data.num_classes=10",
              "model.representation_size=null"]
ZERO_TRAIN = ["trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=10",
              "optim.schedule.warmup_steps=1"]
ZERO_CASES = [(stage, prec) for stage in (0, 1, 2, 3) for prec in ("fp32", "bf16")]

# Activation cases: (label, overrides, micro-batch, dtype, AC every k, attention)
ACT_CASES: list[tuple[str, list[str], int, str, int, str]] = [
    ("w64 d2 32px p8", ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.img_size=32",
                        "model.patch_size=8"], 4, "fp32", 0, "sdpa"),
    ("w192 d4 64px p8", ["model.embed_dim=192", "model.depth=4", "model.num_heads=3", "model.img_size=64",
                         "model.patch_size=8"], 2, "bf16", 0, "sdpa"),
    ("w192 d4 64px p8 AC1", ["model.embed_dim=192", "model.depth=4", "model.num_heads=3",
                             "model.img_size=64", "model.patch_size=8"], 2, "bf16", 1, "sdpa"),
    ("w192 d4 64px p8 AC2", ["model.embed_dim=192", "model.depth=4", "model.num_heads=3",
                             "model.img_size=64", "model.patch_size=8"], 2, "fp32", 2, "sdpa"),
    ("w128 d3 96px p16 ft", ["model.embed_dim=128", "model.depth=3", "model.num_heads=4",
                             "model.img_size=96", "model.patch_size=16", "model.representation_size=null"],
     3, "fp32", 0, "sdpa"),
    ("w128 d6 112px p14 AC3", ["model.embed_dim=128", "model.depth=6", "model.num_heads=2",
                               "model.img_size=112", "model.patch_size=14"], 2, "bf16", 3, "sdpa"),
    ("w96 d2 48px p8 explicit", ["model.embed_dim=96", "model.depth=2", "model.num_heads=3",
                                 "model.img_size=48", "model.patch_size=8"], 2, "fp32", 0, "explicit"),
    ("w96 d2 48px p8 dropout", ["model.embed_dim=96", "model.depth=2", "model.num_heads=3",
                                "model.img_size=48", "model.patch_size=8", "model.dropout=0.1"],
     2, "fp32", 0, "sdpa"),
]

# Paper Table 6 (arXiv 2010.11929): pre-training exaFLOPs on JFT-300M; epochs from Table 2 / 3.
PAPER_TABLE6 = {"vit_b16": (7, 224.0 * 0 + 4.4e3), "vit_l16": (7, 14.7e3), "vit_h14": (14, 34.0e3)}  # placeholder
JFT_IMAGES = 303_000_000


def compose(overrides: list[str]):
    from vitscale.plan.config import compose_config

    return compose_config(overrides)


# ----------------------------------------------------------------------------------- (a) ZeRO
def _live_storages(extra: Any = ()) -> dict[int, tuple[int, str, Any]]:
    """data_ptr -> (nbytes, dtype, tensor) of every live tensor storage visible from Python.

    The tensor is kept so that a snapshot used as a baseline pins its storages: an address freed
    after the snapshot and reused by a new tensor would otherwise hide that tensor from the delta.
    """
    import torch

    out: dict[int, tuple[int, str, Any]] = {}

    def add(t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if s.data_ptr() and s.nbytes():
            out.setdefault(s.data_ptr(), (s.nbytes(), str(t.dtype), t))
        if t.requires_grad and t.grad is not None and t.grad is not t:
            add(t.grad)

    gc.collect()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                add(obj)
        for t in extra:
            add(t)
    return out


def _delta(now: dict[int, tuple[int, str, Any]], base: dict[int, tuple[int, str, Any]],
           exclude: Any = ()) -> int:
    skip = set(base)
    for t in exclude:
        skip.add(t.untyped_storage().data_ptr())
    return sum(v[0] for p, v in now.items() if p not in skip)


def zero_worker(out_path: str) -> None:
    """One process of the 2-rank measurement (torchrun sets RANK / WORLD_SIZE)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from vitscale.engine.build import build_loss, build_model
    from vitscale.engine.deepspeed_config import build as build_ds
    from vitscale.engine.optim import build_optimizer
    from vitscale.plan.memory import model_states_for_cfg, zero_setting

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for stage, precision in ZERO_CASES:
        cfg = compose(ZERO_MODEL + ZERO_TRAIN + [f"deepspeed=zero{stage}", f"trainer.precision={precision}"])
        predicted = model_states_for_cfg(cfg, world, precision=precision, rank=rank)
        base = _live_storages()
        torch.manual_seed(0)
        model = build_model(cfg)
        ds = build_ds(cfg, world, precision=precision, device=torch.device("cpu"))
        opt = build_optimizer(model, cfg.optim, device=torch.device("cpu"), offload=False)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
        loss_fn = build_loss("softmax_xent")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        size = int(cfg.model.img_size)
        g = torch.Generator().manual_seed(rank)

        def fwd_bwd() -> None:
            x = torch.randn(2, 3, size, size, generator=g).to(dtype)
            y = torch.randint(0, 10, (2,), generator=g)
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            del x, y, loss

        params = list(engine.module.parameters())
        fwd_bwd()
        engine.step()
        after_step = _delta(_live_storages(params), base)
        # Reduce buckets live during backward: probe when the gradient reaches the patch embedding
        # (every block's gradients are through DeepSpeed's hooks by then), and again at the end.
        bucket_bytes = int(float(zero_setting(ds["zero_optimization"], "reduce_bucket_size"))) * (
            2 if precision == "bf16" else 4)
        probe: dict[str, int] = {}

        def grad_probe(grad: Any) -> None:
            snap = _live_storages(params)
            probe["mid"] = sum(v[0] for p, v in snap.items() if p not in base and v[0] == bucket_bytes)

        handle = engine.module.patch_embed.register_forward_hook(
            lambda m, i, o: (o.register_hook(grad_probe), None)[1])
        fwd_bwd()
        handle.remove()
        snap = _live_storages(params)
        end_buckets = sum(v[0] for p, v in snap.items() if p not in base and v[0] == bucket_bytes)
        end_backward = _delta(snap, base) - end_buckets
        if stage == 3:  # ZeRO-3's bucket is allocated once and kept: part of the persistent states
            after_step -= end_buckets
        del snap
        engine.step()
        results.append({"stage": stage, "precision": precision, "rank": rank,
                        "measured_after_step": after_step, "measured_end_backward": end_backward,
                        "measured_buffers": max(probe.get("mid", 0), end_buckets),
                        "predicted_after_step": predicted.persistent - (predicted.detail.get("ipg_bucket", 0)),
                        "predicted_end_backward": predicted.end_backward,
                        "predicted_buffers": predicted.detail.get("ipg_bucket", predicted.buffers),
                        "predicted": predicted.as_dict()})
        del engine, opt, model, params
        deepspeed.runtime.utils.empty_cache() if hasattr(deepspeed.runtime.utils, "empty_cache") else None
        gc.collect()
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out_path).write_text(json.dumps([r for part in gathered for r in part], indent=1))
    dist.barrier()
    dist.destroy_process_group()


def run_zero(timeout: float = 600.0) -> list[dict[str, Any]]:
    """Launch the 2-rank worker with torchrun; returns one row per (stage, precision, rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        torchrun = Path(sys.executable).with_name("torchrun")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29650 + os.getpid() % 200),
               __file__, "--zero-worker", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"2-rank ZeRO measurement failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


if __name__ == "__main__" and "--zero-worker" in sys.argv:
    zero_worker(sys.argv[sys.argv.index("--zero-worker") + 1])
    sys.exit(0)
