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

# Paper Table 6 (arXiv 2010.11929, appendix D): pre-training compute on JFT-300M in exaFLOPs
# (1e18), for the run lengths of that table (7 epochs for B/16 and L/16, 14 for L/16 and H/14),
# batch 4096, 224 px. The paper counts forward + backward as 3 x forward.
PAPER_TABLE6 = [("vit_b16_jft", 7, 224.0), ("vit_l16_jft", 7, 783.0), ("vit_l16_jft", 14, 1567.0),
                ("vit_h14_jft", 14, 4262.0)]
JFT_IMAGES = 303_000_000


def compose(overrides: list[str]):
    from vitscale.plan.config import compose_config

    # Synthetic batches only: a shard list satisfies vitscale.config.validate, nothing reads it.
    return compose_config([*overrides, "data.train_shards=synthetic", "data.val_shards=null"])


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

    from vitscale.config import validate
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
        job = validate(cfg)
        model = build_model(job.model)
        ds = build_ds(job, world, precision=precision, device=torch.device("cpu"))
        opt = build_optimizer(model, job.optim, device=torch.device("cpu"), offload=False)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
        loss_fn = build_loss("softmax_xent")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        size = job.model.img_hw[0]
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


# ----------------------------------------------------------------------------- (b) activations
def measure_activations(overrides: list[str], micro_batch: int, precision: str, ac_every: int,
                        attention: str) -> tuple[int, int]:
    """(measured, predicted) activation bytes for one forward + loss of a vitscale ViT on CPU."""
    import contextlib

    import torch

    from vitscale.config import validate
    from vitscale.engine.activation import apply_policy
    from vitscale.engine.build import build_loss, build_model
    from vitscale.plan.memory import activation_bytes, param_groups_numel

    cfg = compose(["data=imagenet", "data.num_classes=10"] + overrides)
    _, _, mcfg = param_groups_numel(cfg)
    predicted = activation_bytes(mcfg, micro_batch, precision=precision, ac_every=ac_every,
                                 attention=attention, device="cpu", loss=str(cfg.trainer.loss)).stored
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    job = validate(cfg)
    model = build_model(job.model).to(dtype).train()
    apply_policy(model, "torch" if ac_every else "none", max(ac_every, 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            saved[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    handles = []
    if ac_every:  # a checkpointed block keeps its input for the recompute (not a saved tensor)
        for i, blk in enumerate(model.blocks):
            if i % ac_every == 0:
                handles.append(blk.register_forward_pre_hook(lambda m, args: keep(args[0])))
    x = torch.randn(micro_batch, job.model.in_chans, *job.model.img_hw).to(dtype)
    y = torch.randint(0, 10, (micro_batch,))
    loss_fn = build_loss(str(cfg.trainer.loss))
    kernel = contextlib.nullcontext()
    if attention == "explicit":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    for h in handles:
        h.remove()
    return sum(saved.values()), predicted


def run_activations() -> list[dict[str, Any]]:
    rows = []
    for label, overrides, mb, precision, every, attention in ACT_CASES:
        measured, predicted = measure_activations(overrides, mb, precision, every, attention)
        rows.append({"case": label, "micro_batch": mb, "precision": precision, "ac_every": every,
                     "attention": attention, "measured": measured, "predicted": predicted,
                     "error": predicted / measured - 1})
    return rows


# ---------------------------------------------------------------------- (c) ZeRO-3 cross-check
def run_zero3_cold(gpus: int = 256, gpus_per_node: int = 8) -> dict[str, Any]:
    """ViT-H/14 (JFT head) ZeRO-3 model states: the planner vs deepspeed's all-cold estimate."""
    import contextlib
    import io

    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    from vitscale.plan.memory import model_states_for_cfg, param_groups_numel

    cfg = compose(["+experiment=vit_h14_jft"])
    groups, largest_block, _ = param_groups_numel(cfg)
    total = sum(sum(g) for g in groups)
    largest_layer = max(n for g in groups for n in g)  # deepspeed: the largest single parameter
    nodes = gpus // gpus_per_node
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        estimate_zero3_model_states_mem_needs_all_cold(total, largest_layer, gpus_per_node, nodes)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest_layer, gpus_per_node, nodes,
                                                         cpu_offload=False, cpu_offload_params=False)
    ours = model_states_for_cfg(cfg, gpus, precision="bf16")
    per_param_ds = 18 * total / gpus
    per_param_ours = ours.params + ours.grads + ours.optim - ours.detail["persistent_params"]
    return {"params": total, "largest_layer": largest_layer, "gpus": gpus,
            "deepspeed_gpu_bytes": ds_gpu, "deepspeed_18_per_param": per_param_ds,
            "ours_16_per_param": per_param_ours, "ours_states": ours.params + ours.grads + ours.optim,
            "ours_persistent_params": ours.detail["persistent_params"], "ours_ipg_bucket": ours.detail["ipg_bucket"],
            "ratio_per_param": per_param_ours / per_param_ds, "deepspeed_printout": printed.getvalue()}


# ----------------------------------------------------------------------------- (d) paper compute
def run_compute() -> list[dict[str, Any]]:
    from vitscale.models.flops import macs_per_image
    from vitscale.plan.memory import param_groups_numel

    rows = []
    for experiment, epochs, paper_exa in PAPER_TABLE6:
        cfg = compose([f"+experiment={experiment}"])
        _, _, mcfg = param_groups_numel(cfg)
        per_image = 3 * 2 * macs_per_image(mcfg, 224)  # forward MACs x 2 FLOPs x 3 (fwd + bwd)
        exa = per_image * JFT_IMAGES * epochs / 1e18
        rows.append({"model": mcfg.name, "epochs": epochs, "paper_exaflops": paper_exa,
                     "predicted_exaflops": exa, "error": exa / paper_exa - 1})
    return rows


# -------------------------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="zero,activations,zero3_cold,compute")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    out: dict[str, Any] = {}
    ok = True
    if "zero" in only:
        rows = run_zero()
        out["zero"] = rows
        print("(a) model states per rank, DeepSpeed 0.19 on 2 gloo ranks (bytes; buffers = reduce bucket, default 5e8 elements)")
        print(f"{'stage':>5} {'prec':>5} {'rank':>4} | {'after step meas':>15} {'pred':>11} {'err':>7} | "
              f"{'end bwd meas':>12} {'pred':>11} {'err':>7} | {'buffers meas':>13} {'pred':>13}")
        for r in sorted(rows, key=lambda r: (r["stage"], r["precision"], r["rank"])):
            e1 = r["predicted_after_step"] / r["measured_after_step"] - 1
            e2 = r["predicted_end_backward"] / r["measured_end_backward"] - 1
            ok &= abs(e1) <= 0.02 and abs(e2) <= 0.02 and r["predicted_buffers"] == r["measured_buffers"]
            print(f"{r['stage']:>5} {r['precision']:>5} {r['rank']:>4} | {r['measured_after_step']:>15,} "
                  f"{r['predicted_after_step']:>11,} {e1:>+7.3%} | {r['measured_end_backward']:>12,} "
                  f"{r['predicted_end_backward']:>11,} {e2:>+7.3%} | {r['measured_buffers']:>13,} "
                  f"{r['predicted_buffers']:>13,}")
        print()
    if "activations" in only:
        rows = run_activations()
        out["activations"] = rows
        print("(b) activation bytes saved for backward (saved_tensors_hooks, by storage) + checkpointed block inputs")
        print(f"{'case':<26} {'mb':>3} {'prec':>5} {'AC':>4} {'attention':>9} | {'measured':>11} {'predicted':>11} {'err':>7}")
        for r in rows:
            ok &= abs(r["error"]) <= 0.10
            print(f"{r['case']:<26} {r['micro_batch']:>3} {r['precision']:>5} {r['ac_every'] or '-':>4} "
                  f"{r['attention']:>9} | {r['measured']:>11,} {r['predicted']:>11,} {r['error']:>+7.3%}")
        print()
    if "zero3_cold" in only:
        r = run_zero3_cold()
        out["zero3_cold"] = r
        print("(c) ViT-H/14 ZeRO-3 model states on 256 GPUs vs deepspeed.estimate_zero3_model_states_mem_needs_all_cold")
        print(r["deepspeed_printout"].rstrip())
        print(f"deepspeed (offload none): {r['deepspeed_gpu_bytes'] / 2**30:.3f} GiB = 18 B/param "
              f"({r['deepspeed_18_per_param'] / 2**30:.3f} GiB) + 4 x largest layer")
        print(f"planner: {r['ours_16_per_param'] / 2**30:.3f} GiB partitioned (16 B/param: bf16 param 2 + bf16 grad 2 "
              f"+ fp32 master 4 + Adam 8) + {r['ours_persistent_params'] / 2**30:.3f} GiB unpartitioned small "
              f"params + {r['ours_ipg_bucket'] / 2**30:.3f} GiB reduce bucket; per-param ratio "
              f"{r['ratio_per_param']:.4f} (= 16/18: DeepSpeed's estimate assumes fp32 gradients)")
        print()
    if "compute" in only:
        rows = run_compute()
        out["compute"] = rows
        print("(d) pre-training compute on JFT-300M (303M images), batch 4096, 224 px vs paper Table 6")
        print(f"{'model':<8} {'epochs':>6} | {'paper EF':>9} {'planner EF':>11} {'err':>7}")
        for r in rows:
            ok &= abs(r["error"]) <= 0.03
            print(f"{r['model']:<8} {r['epochs']:>6} | {r['paper_exaflops']:>9,.0f} {r['predicted_exaflops']:>11,.1f} "
                  f"{r['error']:>+7.2%}")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print("all within tolerance" if ok else "OUT OF TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__" and "--zero-worker" in sys.argv:
    zero_worker(sys.argv[sys.argv.index("--zero-worker") + 1])
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
