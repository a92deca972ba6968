"""The plan: every ZeRO stage x checkpointing policy for a training config on a stated machine.

Memory comes from `vitscale.plan.memory` (DeepSpeed-exact model states, measured-exact activations);
time from the model's analytic FLOPs (`vitscale.models.flops`, forward MACs x 2 x 3 for forward +
backward, plus the recomputed forward of checkpointed blocks) at an assumed MFU, and from the bytes
each ZeRO stage moves per optimizer step over the stated bandwidth (ring collectives: each GPU
sends (N-1)/N of the buffer per all-gather or reduce-scatter, twice that per all-reduce).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitscale.hardware import GPU, get_gpu, register_gpus
from vitscale.plan.memory import (DTYPE_BYTES, Activations, ModelStates, activation_bytes, model_states,
                                  param_groups_numel)

GB = 1e9
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Images per epoch of the datasets the configs name, keyed by their number of classes.
DATASET_IMAGES = {18291: 303_000_000, 21843: 14_197_122, 1000: 1_281_167, 10: 60_000}
STAGE_NAMES = ("0", "1", "2", "3", "3o")


@dataclass
class Row:
    stage: str
    ac_every: int
    params: int
    grads: int
    optim: int
    buffers: int
    act_per_image: int          # activation peak bytes per image in the micro-batch
    states: int                 # params + grads + optim (+ ZeRO-3's kept bucket is in buffers)
    host: int                   # CPU bytes per GPU (offload)
    max_micro_batch: int        # largest micro-batch that fits with the headroom (0 = nothing fits)
    micro_batch: int            # largest micro-batch <= max that divides global / GPUs
    accumulation: int
    activations: int            # bytes at micro_batch
    peak: int                   # states + buffers + activations at micro_batch (or at 1 if none fits)
    compute_s: float
    comm_s: float
    offload_s: float
    step_s: float
    mfu_effective: float
    run_hours: float
    fits: bool
    configured: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _zero_block(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The ZeRO block vitscale would run for ``stage``: the configured one when it is that stage,
    else the repository preset (configs/deepspeed/zero{stage}.yaml, zero3_offload.yaml for 3o)."""
    own = OmegaConf.to_container(cfg.deepspeed.zero_optimization, resolve=True)
    assert isinstance(own, dict)
    if _stage_label(own) == stage:
        return own
    name = "zero3_offload" if stage == "3o" else f"zero{stage}"
    preset = OmegaConf.load(CONFIG_DIR / "deepspeed" / f"{name}.yaml")
    block = OmegaConf.to_container(preset.zero_optimization, resolve=True)
    assert isinstance(block, dict)
    return block


def _stage_label(zero: dict[str, Any]) -> str:
    stage = str(int(zero.get("stage", 0)))
    offload = any(bool(zero.get(k)) and str(zero[k].get("device", "none")) in ("cpu", "nvme")
                  for k in ("offload_optimizer", "offload_param"))
    return "3o" if stage == "3" and offload else stage


def resolve_precision(cfg: DictConfig, gpu: GPU) -> str:
    plan = cfg.get("plan") or {}
    requested = str(plan.get("precision") or cfg.trainer.precision)
    if requested == "auto":  # vitscale: bf16 on CUDA devices that support it, fp32 elsewhere
        return "bf16" if gpu.bf16 > 0 else "fp32"
    if requested not in DTYPE_BYTES:
        raise ValueError(f"precision {requested!r}: expected auto, fp32, bf16 or fp16")
    if gpu.peak(requested) <= 0:
        raise ValueError(f"{gpu.name} has no {requested} tensor cores (peak 0); use another precision")
    return requested


def _divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 0


def _plan_settings(cfg: DictConfig) -> dict[str, Any]:
    defaults = {"gpu": "h100-80gb", "gpus": 8, "gpus_per_node": 8, "inter_node_bandwidth": 50.0,
                "intra_node_bandwidth": None, "pcie_bandwidth": 25.0, "cpu_adam_params_per_s": 1e9,
                "mfu": 0.4, "comm_overlap": 0.0, "headroom": 0.1, "precision": None,
                "stages": list(STAGE_NAMES), "ac_every": [0, 2, 1], "attention": "sdpa",
                "dataset_images": None, "epochs": None, "gpu_table": {}, "json": False}
    plan = cfg.get("plan")
    given = OmegaConf.to_container(plan, resolve=True) if isinstance(plan, DictConfig) else dict(plan or {})
    out = {**defaults, **{k: v for k, v in given.items() if v is not None or k in ("precision",)}}
    for key in ("gpus", "gpus_per_node"):
        if int(out[key]) < 1:
            raise ValueError(f"plan.{key}={out[key]}: must be >= 1")
    if not 0.0 < float(out["mfu"]) <= 1.0:
        raise ValueError(f"plan.mfu={out['mfu']}: expected a fraction in (0, 1]")
    if not 0.0 <= float(out["headroom"]) < 1.0:
        raise ValueError(f"plan.headroom={out['headroom']}: expected a fraction in [0, 1)")
    if not 0.0 <= float(out["comm_overlap"]) <= 1.0:
        raise ValueError(f"plan.comm_overlap={out['comm_overlap']}: expected a fraction in [0, 1]")
    stages = [str(s) for s in out["stages"]]
    bad = [s for s in stages if s not in STAGE_NAMES]
    if bad:
        raise ValueError(f"plan.stages: unknown {bad}; expected some of {list(STAGE_NAMES)}")
    out["stages"] = stages
    out["ac_every"] = [int(k) for k in out["ac_every"]]
    if any(k < 0 for k in out["ac_every"]):
        raise ValueError("plan.ac_every: 0 (none) or k >= 1 (every k-th block)")
    return out


def configured_ac_every(cfg: DictConfig) -> int:
    ac = cfg.trainer.activation_checkpointing
    return 0 if str(ac.policy) == "none" else int(ac.every)


def comm_bytes_per_step(stage: str, psi: int, b: int, world: int, accumulation: int) -> float:
    """Bytes one GPU sends per optimizer step (ring collectives over the data-parallel group)."""
    if world <= 1:
        return 0.0
    f = (world - 1) / world * psi * b
    if stage in ("0", "1"):
        return 2 * f  # all-reduce (ZeRO-1: reduce-scatter of gradients + all-gather of parameters)
    if stage == "2":
        return accumulation * f + f  # gradients reduce-scattered every micro-step, parameters gathered once
    return accumulation * 3 * f  # ZeRO-3: gather for forward and backward, reduce-scatter gradients


def _normalise(cfg: DictConfig) -> DictConfig:
    """A fine-tune experiment without its (mandatory) source still plans as a fine-tune."""
    if OmegaConf.is_missing(cfg.finetune, "source"):
        cfg = cfg.copy()
        cfg.finetune.source = "planned-fine-tune"
    return cfg


def make_plan(cfg: DictConfig) -> dict[str, Any]:
    """The whole plan as plain data: setting, one row per stage x AC policy, run totals."""
    cfg = _normalise(cfg)
    s = _plan_settings(cfg)
    register_gpus(s["gpu_table"])
    gpu = get_gpu(str(s["gpu"]))
    world, per_node = int(s["gpus"]), int(s["gpus_per_node"])
    precision = resolve_precision(cfg, gpu)
    b = DTYPE_BYTES[precision]
    groups, largest, mcfg = param_groups_numel(cfg)
    psi = sum(sum(g) for g in groups)
    from vitscale.models.flops import macs_per_image

    macs = macs_per_image(mcfg)
    flops_fwd = 2.0 * macs
    global_batch = int(cfg.trainer.global_batch_size)
    per_gpu = global_batch / world
    peak_flops = gpu.peak(precision)
    usable = gpu.memory * (1.0 - float(s["headroom"]))
    nodes = math.ceil(world / per_node)
    bw = (float(s["inter_node_bandwidth"]) if nodes > 1 else
          float(s["intra_node_bandwidth"] or gpu.link_gbps)) * GB
    steps, images, epochs, dataset = _run_length(cfg, s)
    optimizer = str(cfg.optim.name)
    momentum = cfg.optim.get("momentum")
    loss = str(cfg.trainer.loss)
    conf_stage = _stage_label(OmegaConf.to_container(cfg.deepspeed.zero_optimization, resolve=True))  # type: ignore[arg-type]
    conf_ac = configured_ac_every(cfg)
    rows: list[Row] = []
    combos = [(st, k) for st in s["stages"] for k in s["ac_every"]]
    if (conf_stage, conf_ac) not in combos:
        combos.append((conf_stage, conf_ac))
    for stage, every in combos:
        zero = _zero_block(stage, cfg)
        ms = model_states(groups, stage=int(stage[0]), precision=precision, world=world, optimizer=optimizer,
                          momentum=momentum, zero=zero, largest_module=largest)
        act = activation_bytes(mcfg, 1, precision=precision, ac_every=every, attention=str(s["attention"]),
                               device="cuda", loss=loss)
        rows.append(_row(stage, every, ms, act, usable=usable, global_batch=global_batch, world=world,
                         psi=psi, b=b, flops_fwd=flops_fwd, peak=peak_flops, s=s, bw=bw, steps=steps,
                         configured=(stage, every) == (conf_stage, conf_ac)))
    conf = next(r for r in rows if r.configured)
    conf_micro = int(cfg.trainer.micro_batch_size)
    totals = {
        "images": images, "steps": steps, "epochs": epochs, "dataset_images": dataset,
        "flops_per_image_fwd": flops_fwd, "train_flops": images * 3.0 * flops_fwd,
        "global_batch": global_batch, "per_gpu_batch": per_gpu,
        "configured_stage": conf.stage, "configured_ac_every": conf.ac_every,
        "configured_micro_batch": conf_micro,
        "configured_accumulation": (global_batch / (conf_micro * world)),
        "configured_fits": _fits_at(conf, conf_micro, usable),
        "wall_clock_hours": conf.run_hours, "gpu_hours": conf.run_hours * world,
    }
    setting = {
        "model": mcfg.name, "params": psi, "img_size": list(mcfg.img_hw), "patch_size": mcfg.patch_size,
        "tokens": mcfg.grid_size[0] * mcfg.grid_size[1] + mcfg.num_prefix_tokens,
        "embed_dim": mcfg.embed_dim, "depth": mcfg.depth, "num_classes": mcfg.num_classes,
        "gpu": gpu.name, "gpu_memory": gpu.memory, "gpus": world, "gpus_per_node": per_node, "nodes": nodes,
        "precision": precision, "peak_flops": peak_flops, "mfu": float(s["mfu"]),
        "headroom": float(s["headroom"]), "bandwidth_gbps": bw / GB,
        "bandwidth_kind": "inter-node" if nodes > 1 else "intra-node", "comm_overlap": float(s["comm_overlap"]),
        "attention": s["attention"], "optimizer": optimizer,
    }
    return {"setting": setting, "rows": [r.as_dict() for r in rows], "totals": totals}


def _fits_at(row: Row, micro: int, usable: float) -> bool:
    return row.states + row.buffers + micro * row.act_per_image <= usable


def _row(stage: str, every: int, ms: ModelStates, act: Activations, *, usable: float, global_batch: int,
         world: int, psi: int, b: int, flops_fwd: float, peak: float, s: dict[str, Any], bw: float,
         steps: int, configured: bool) -> Row:
    states = ms.params + ms.grads + ms.optim
    budget = usable - states - ms.buffers
    step_fits = states + ms.step_transient <= usable
    max_micro = max(int(budget // act.peak), 0) if act.peak > 0 and step_fits else 0
    per_gpu = global_batch // world if global_batch % world == 0 else 0
    micro = _divisor_at_most(per_gpu, max_micro) if per_gpu else min(max_micro, 1)
    fits = micro >= 1
    mb = max(micro, 1)
    accumulation = (per_gpu // mb) if per_gpu else 0
    images_per_gpu = global_batch / world
    compute = images_per_gpu * flops_fwd * (3.0 + act.recompute_fraction) / (peak * float(s["mfu"]))
    comm = comm_bytes_per_step(stage, psi, b, world, max(accumulation, 1)) / bw
    offload = 0.0
    if stage == "3o":
        part = psi / world
        pcie = float(s["pcie_bandwidth"]) * GB
        # gradients to the host every micro-step, parameters from the host for forward and backward
        offload = max(accumulation, 1) * 3 * part * b / pcie + part / float(s["cpu_adam_params_per_s"])
    step = compute + comm * (1.0 - float(s["comm_overlap"])) + offload
    mfu_eff = images_per_gpu * flops_fwd * 3.0 / (step * peak) if step > 0 else 0.0
    return Row(stage, every, ms.params, ms.grads, ms.optim, ms.buffers, act.peak, states, ms.host, max_micro,
               micro, accumulation, mb * act.peak, states + ms.buffers + mb * act.peak, compute, comm, offload,
               step, mfu_eff, steps * step / 3600.0, fits, configured)


def _run_length(cfg: DictConfig, s: dict[str, Any]) -> tuple[int, int, float | None, int | None]:
    """(optimizer steps, images, epochs, images per epoch) of the run."""
    gb = int(cfg.trainer.global_batch_size)
    num_classes = int(cfg.finetune.num_classes if cfg.finetune.get("source") else cfg.data.num_classes)
    dataset = s.get("dataset_images") or DATASET_IMAGES.get(num_classes)
    dataset = int(dataset) if dataset else None
    if s.get("epochs"):
        if not dataset:
            raise ValueError("plan.epochs needs plan.dataset_images (images per epoch) for this dataset")
        images = int(round(float(s["epochs"]) * dataset))
        steps = math.ceil(images / gb)
    else:
        steps = int(cfg.trainer.max_steps)
        images = steps * gb
    epochs = images / dataset if dataset else None
    return steps, images, epochs, dataset


def plan_summary(cfg: DictConfig, world_size: int, *, gpu: str | None = None) -> dict[str, float | int | str]:
    """Flat, MLflow-param-ready planner figures for the configured setting (its ZeRO stage, AC policy
    and micro-batch) on ``world_size`` GPUs. ``gpu``: a vitscale.hardware name; default plan.gpu if
    the config has a plan section, else the current CUDA device when the table knows it, else
    h100-80gb (the figures then describe that GPU, as ``plan/gpu`` says)."""
    from omegaconf import open_dict

    cfg = cfg.copy()
    name = gpu or _detect_gpu(cfg)
    with open_dict(cfg):
        plan = dict(OmegaConf.to_container(cfg.plan, resolve=True)) if cfg.get("plan") else {}
        plan.update(gpu=name, gpus=int(world_size),
                    stages=[_stage_label(OmegaConf.to_container(cfg.deepspeed.zero_optimization, resolve=True))],  # type: ignore[arg-type]
                    ac_every=[configured_ac_every(cfg)])
        cfg.plan = plan
    p = make_plan(cfg)
    row = next(r for r in p["rows"] if r["configured"])
    st, tot = p["setting"], p["totals"]
    micro = int(cfg.trainer.micro_batch_size)
    act = micro * row["act_per_image"]
    g = 1.0 / GB
    return {
        "plan/gpu": st["gpu"], "plan/gpus": st["gpus"], "plan/precision": st["precision"],
        "plan/zero_stage": row["stage"], "plan/ac_every": row["ac_every"],
        "plan/params": st["params"], "plan/tokens": st["tokens"],
        "plan/params_gb": round(row["params"] * g, 3), "plan/grads_gb": round(row["grads"] * g, 3),
        "plan/optim_gb": round(row["optim"] * g, 3), "plan/buffers_gb": round(row["buffers"] * g, 3),
        "plan/activations_gb": round(act * g, 3),
        "plan/peak_gb": round((row["states"] + row["buffers"] + act) * g, 3),
        "plan/gpu_memory_gb": round(st["gpu_memory"] * g, 3), "plan/headroom": st["headroom"],
        "plan/micro_batch": micro, "plan/max_micro_batch": row["max_micro_batch"],
        "plan/accumulation": round(tot["configured_accumulation"], 4), "plan/fits": str(tot["configured_fits"]),
        "plan/mfu_assumed": st["mfu"], "plan/mfu_effective": round(row["mfu_effective"], 4),
        "plan/compute_s": round(row["compute_s"], 4), "plan/comm_s": round(row["comm_s"], 4),
        "plan/step_s": round(row["step_s"], 4), "plan/flops_per_image": tot["flops_per_image_fwd"] * 3.0,
        "plan/train_flops": tot["train_flops"], "plan/images": tot["images"], "plan/steps": tot["steps"],
        "plan/wall_clock_h": round(row["run_hours"], 2), "plan/gpu_hours": round(row["run_hours"] * st["gpus"], 1),
    }


def _detect_gpu(cfg: DictConfig) -> str:
    plan = cfg.get("plan")
    if plan is not None and plan.get("gpu"):
        return str(plan.gpu)
    try:
        import torch

        if torch.cuda.is_available():
            from vitscale.hardware import match_device_name

            found = match_device_name(torch.cuda.get_device_name())
            if found is not None:
                return found.name
    except Exception:  # noqa: BLE001 - detection is best effort
        pass
    return "h100-80gb"
