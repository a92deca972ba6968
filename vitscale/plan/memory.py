"""Bytes per GPU of model states (exactly as DeepSpeed 0.19 allocates them) and of ViT activations.

Model states follow DeepSpeed's own code paths for the configs vitscale generates (a torch optimizer
handed to ``deepspeed.initialize``, no ``grad_accum_dtype`` set):

- ZeRO-0 fp32: the torch optimizer on the module's own parameters (no wrapper). bf16/fp16:
  ``FP16_UnfusedOptimizer`` keeps an fp32 master copy of every parameter; the low-precision
  gradients are copied to fp32 during ``step()``; gradients are all-reduced through flattened
  buckets of ``allreduce_bucket_size`` (5e8) elements at the accumulation boundary.
- ZeRO-1/2: ``DeepSpeedZeroOptimizer``: per optimizer param group one flat low-precision buffer of
  all parameters padded to a multiple of 2 x world (``nccl_start_alignment_factor``); this rank's
  1/world slice cloned to fp32 (the master, also in fp32 training); optimizer states on that slice;
  gradients of the parameters that *overlap* this rank's slice kept whole in ``grads_in_partition``
  (model dtype); ``reduce_bucket_size`` (5e8) elements of reduce buffer (x2 with overlap_comm) live
  during backward (contiguous_gradients).
- ZeRO-3: ``DeepSpeedZeroOptimizer_Stage3``: every parameter padded to a multiple of world and
  split; per element this rank holds the low-precision partition, a gradient partition (model
  dtype), an fp32 master and the optimizer states; parameters of <= ``stage3_param_persistence_
  threshold`` (1e5) elements stay whole on every rank; the ``reduce_bucket_size`` reduce buffer
  is allocated once and kept (contiguous_gradients); gathered parameters live while their module
  runs (one block plus ``stage3_prefetch_bucket_size``).

Activations: what autograd saves for backward in `vitscale.models` (pre-LN blocks, SDPA attention,
exact GELU), counted by storage as DeepSpeed-bf16 / fp32 training runs it (no autocast; the model
and its inputs are in the training dtype). Per block, per image, with T tokens and width D (hidden
4D): x, LN1(x), qkv (3D, q/k/v are views), the attention output (the SDPA kernels write it in
(B, T, H, d) order, so the proj input is a view of it), x+attn, LN2, fc1 (4D), GELU (4D) = 16 D
values, plus two LayerNorms' mean/rstd and the attention log-sum-exp. Explicit (math) attention
adds the scaled q and k, a contiguous copy of the output and the (H, T, T) probabilities; dropout adds
its masks. A checkpointed block keeps only its input (D values per token); the backward then
recomputes one block at a time, so one block's full set is live on top (the recompute peak).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed 0.19 defaults (deepspeed/runtime/zero/config.py, engine.py) used when the ZeRO block
# of the config does not set them.
DS_DEFAULTS = {
    "reduce_bucket_size": int(5e8),
    "allgather_bucket_size": int(5e8),
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": int(5e7),
    "stage3_param_persistence_threshold": int(1e5),
    "stage3_model_persistence_threshold": 2**63 - 1,
    "stage3_max_live_parameters": int(1e9),
    "allreduce_bucket_size": int(5e8),  # engine.MEMORY_OPT_ALLREDUCE_SIZE (ZeRO-0)
}
NCCL_START_ALIGNMENT_FACTOR = 2
STEP_TENSOR_BYTES = 4  # torch.optim AdamW/Adam keep `step` as a float32 0-d tensor per parameter


def optimizer_state_count(name: str, momentum: float | None = None) -> int:
    """fp32 state tensors per master element: Adam/AdamW 2 (exp_avg, exp_avg_sq), SGD 1 with momentum."""
    if name in ("adamw", "adam"):
        return 2
    if name == "sgd":
        return 1 if momentum else 0
    raise ValueError(f"optimizer {name!r}: the planner knows adamw and sgd")


def zero_setting(zero: Mapping[str, Any], key: str) -> Any:
    """A ZeRO option as DeepSpeed resolves it (its pydantic aliases and defaults)."""
    aliases = {"stage3_prefetch_bucket_size": "prefetch_bucket_size",
               "stage3_param_persistence_threshold": "param_persistence_threshold",
               "stage3_model_persistence_threshold": "model_persistence_threshold",
               "stage3_max_live_parameters": "max_live_parameters"}
    for k in (key, aliases.get(key)):
        if k and k in zero and zero[k] is not None:
            return zero[k]
    if key == "overlap_comm":
        return int(zero.get("stage", 0)) == 3  # DeepSpeed: None -> True only for stage 3
    return DS_DEFAULTS[key]


@dataclass
class ModelStates:
    """Bytes on one GPU (the worst rank) and, for offload, in its host memory."""

    stage: str
    params: int             # low-precision (or fp32) parameters resident on the GPU
    grads: int              # gradient storage at the end of backward
    optim: int              # fp32 master copy + optimizer states (+ step counters)
    buffers: int            # reduce / gather buffers live during backward (DeepSpeed defaults)
    step_transient: int     # extra bytes only during optimizer.step() (no activations then)
    host: int = 0           # bytes in CPU memory per GPU (offload)
    persistent: int = 0     # allocated between steps (after step(): what stays)
    end_backward: int = 0   # params + grads + optim at the end of backward (buffers apart)
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.buffers

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple)) * multiple


def zero12_partition_overlap(group: Sequence[int], world: int) -> tuple[int, int, list[int]]:
    """(padded flat numel, partition numel, per rank: numel of whole parameters overlapping its slice)."""
    total = sum(group)
    padded = _pad(total, NCCL_START_ALIGNMENT_FACTOR * world)
    part = padded // world
    overlap = [0] * world
    start = 0
    for n in group:
        end = start + n
        if n:
            first, last = start // part, min((end - 1) // part, world - 1)
            for r in range(first, last + 1):
                overlap[r] += n
        start = end
    return padded, part, overlap


def model_states(groups: Sequence[Sequence[int]], *, stage: int, precision: str, world: int,
                 optimizer: str = "adamw", momentum: float | None = None,
                 zero: Mapping[str, Any] | None = None, largest_module: int | None = None,
                 rank: int | None = None) -> ModelStates:
    """Model-state bytes per GPU for parameter ``groups`` (the optimizer's param groups, numel per
    parameter in model order) under ZeRO ``stage`` on ``world`` data-parallel ranks.

    ``zero`` is the ``zero_optimization`` block (offload_optimizer / offload_param, bucket sizes);
    ``largest_module`` the most parameters one module gathers at a time under ZeRO-3 (a block);
    ``rank``: that rank's bytes (ZeRO-1/2 gradient slices differ by rank), default the largest.
    """
    zero = dict(zero or {})
    if precision not in DTYPE_BYTES:
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")
    b = DTYPE_BYTES[precision]
    lowp = b < 4
    k = optimizer_state_count(optimizer, momentum)
    flat = [n for g in groups for n in g]
    psi = sum(flat)
    n_tensors = len(flat)
    offload_opt = _offload(zero, "offload_optimizer")
    offload_par = _offload(zero, "offload_param")
    bucket = int(float(zero_setting(zero, "reduce_bucket_size")))
    overlap = bool(zero_setting(zero, "overlap_comm"))
    contiguous = bool(zero_setting(zero, "contiguous_gradients"))
    detail: dict[str, int] = {}

    if stage == 0:
        params = psi * b
        grads = psi * b
        master = psi * 4 if lowp else 0
        states = psi * 4 * k + (n_tensors * STEP_TENSOR_BYTES if optimizer in ("adamw", "adam") else 0)
        optim = master + states
        buffers = 0
        # step(): all-reduce through flattened buckets; bf16/fp16 also copy every gradient to fp32.
        allreduce = min(psi, int(float(zero.get("allreduce_bucket_size", DS_DEFAULTS["allreduce_bucket_size"])))) * b
        step_transient = allreduce + (psi * 4 if lowp else 0)
        detail.update(master=master, optimizer_states=states, allreduce_bucket=allreduce)
        persistent = params + optim
        end_backward = params + grads + optim
        return ModelStates("0", params, grads, optim, buffers, step_transient, 0, persistent, end_backward, detail)

    if stage in (1, 2):
        params = master_el = 0
        overlap_by_rank = [0] * world
        for g in groups:
            padded, part, ov = zero12_partition_overlap(g, world)
            params += padded * b
            master_el += part
            overlap_by_rank = [a + c for a, c in zip(overlap_by_rank, ov)]
        grads = (max(overlap_by_rank) if rank is None else overlap_by_rank[rank]) * b
        master = master_el * 4
        states = master_el * 4 * k + (len(groups) * STEP_TENSOR_BYTES if optimizer in ("adamw", "adam") else 0)
        buffers = bucket * b * (2 if overlap else 1) if contiguous else 0
        step_transient = master_el * 4  # the flat fp32 gradient of this rank's slice
        host = 0
        optim = master + states
        if offload_opt:  # master, states and the fp32 gradient slice move to host memory
            host, optim, step_transient = optim + master_el * 4, 0, 0
        detail.update(master=master, optimizer_states=states, grads_in_partition=grads,
                      reduce_buckets=buffers)
        persistent = params + optim
        return ModelStates(str(stage), params, grads, optim, buffers, step_transient, host, persistent,
                           params + grads + optim, detail)

    if stage != 3:
        raise ValueError(f"ZeRO stage {stage}: expected 0, 1, 2 or 3")
    threshold = int(float(zero_setting(zero, "stage3_param_persistence_threshold")))
    model_threshold = int(float(zero_setting(zero, "stage3_model_persistence_threshold")))
    part_el = sum(_pad(n, world) // world for n in flat)
    persist_el, total_persist = 0, 0
    for n in flat:  # named_parameters order, as mark_persistent_parameters walks it
        if n + total_persist > model_threshold:
            continue
        if n <= threshold:
            persist_el += n
            total_persist += n
    lp_part = part_el * b
    grad_part = part_el * b
    master = part_el * 4
    states = part_el * 4 * k + (len(groups) * STEP_TENSOR_BYTES if optimizer in ("adamw", "adam") else 0)
    persistent_full = persist_el * b
    ipg = bucket * b if contiguous else 0
    prefetch = int(float(zero_setting(zero, "stage3_prefetch_bucket_size")))
    max_live = int(float(zero_setting(zero, "stage3_max_live_parameters")))
    gathered = min(max_live, (largest_module or 0) + prefetch) * b
    host = 0
    params = lp_part + persistent_full
    grads = grad_part
    optim = master + states
    if offload_opt:  # fp32 master, states, the gradient partition and its fp32 copy on the host
        host += optim + grad_part + part_el * 4
        optim, grads = 0, 0
    if offload_par:
        host += lp_part
        params = persistent_full
    detail.update(lp_partition=lp_part, persistent_params=persistent_full, grad_partition=grad_part,
                  master=master, optimizer_states=states, ipg_bucket=ipg, gathered_params=gathered)
    persistent = params + grads + optim + ipg
    # step(): with optimizer states on the GPU the fp32 gradient of the sub-group is a transient copy
    step_transient = 0 if offload_opt else part_el * 4
    return ModelStates("3o" if (offload_opt or offload_par) else "3", params, grads, optim, ipg + gathered,
                       step_transient, host, persistent, params + grads + optim, detail)


def _offload(zero: Mapping[str, Any], key: str) -> bool:
    block = zero.get(key)
    return bool(block) and str(block.get("device", "none")) in ("cpu", "nvme")


# ------------------------------------------------------------------------------------ activations
@dataclass
class Activations:
    """Activation bytes for one micro-batch on one GPU."""

    per_block: int          # one block's saved tensors (no checkpointing)
    stored: int             # everything saved at the end of forward (checkpointed blocks: inputs only)
    peak: int               # stored + the recompute of one checkpointed block + backward workspace
    checkpointed_blocks: int
    recompute_fraction: float  # extra forward FLOPs of recomputation / forward FLOPs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_bytes(model: Any, micro_batch: int, *, precision: str, ac_every: int = 0,
                     attention: str = "sdpa", device: str = "cuda", loss: str = "softmax_xent",
                     training: bool = True) -> Activations:
    """Activation bytes of a vitscale ViT (``ModelConfig`` or its dict) for ``micro_batch`` images.

    ``ac_every``: 0 = no checkpointing, k = blocks 0, k, 2k, ... checkpointed (vitscale's policy).
    ``device``: ``cuda`` keeps LayerNorm mean/rstd in fp32; on ``cpu`` they follow the input dtype.
    """
    from vitscale.models.registry import ModelConfig

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(**dict(model))
    if attention not in ("sdpa", "explicit"):
        raise ValueError(f"attention {attention!r}: expected sdpa or explicit")
    b = DTYPE_BYTES[precision]
    B = int(micro_batch)
    gh, gw = cfg.grid_size
    T = gh * gw + cfg.num_prefix_tokens
    D, Hd, H = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.num_heads
    stat = 4 if (device == "cuda" or b == 4) else b
    mask = 1 if device == "cuda" else b  # dropout masks: bool on CUDA, the input dtype on CPU
    drop = training and cfg.dropout > 0
    adrop = training and cfg.attn_dropout > 0

    tok = B * T
    block = tok * (8 * D + 2 * Hd) * b  # x, LN1, qkv (3D), attn out, x+attn, LN2 (D each) + fc1, GELU (4D)
    block += 2 * 2 * tok * stat  # two LayerNorms: mean, rstd
    block += B * H * T * 4  # SDPA log-sum-exp (fp32)
    if attention == "explicit":
        # math path: scaled q, k^T and a contiguous v replace the qkv buffer (same 3D), the output
        # copy replaces the kernel's output (same D); the (H, T, T) probabilities come on top.
        block += B * H * T * T * b - B * H * T * 4
        if adrop:
            block += B * H * T * T * (mask + b)  # mask + dropped probabilities
    # (SDPA kernels with attention dropout keep only the RNG state and recompute the mask.)
    if drop:  # proj_drop, drop1 (hidden), drop2 masks; the dropped tensors replace the ones saved before
        block += tok * (D + Hd + D) * mask
    if training and cfg.drop_path > 0:
        block += 2 * B * b

    L = cfg.depth
    ckpt = 0 if ac_every <= 0 else len(range(0, L, ac_every))
    plain = L - ckpt
    stored_blocks = plain * block + ckpt * tok * D * b

    # Embedding: the (cast) input images feed the patch conv; with dropout its mask.
    embed = B * cfg.in_chans * cfg.img_hw[0] * cfg.img_hw[1] * b
    if cfg.is_hybrid:  # ResNet stem: roughly 3 saved tensors per conv output (conv in, GN in, act)
        embed += _hybrid_stem_bytes(cfg, B, b)
    if drop:
        embed += tok * D * mask
    # Head: final LN (input + stats; its output feeds the token select / pooling), pre-logits, logits.
    head = tok * D * b + 2 * tok * stat + tok * D * b
    feats = cfg.representation_size or D
    if cfg.representation_size:
        head += B * feats * b  # tanh output (saved by tanh and the head Linear)
    if cfg.num_classes:
        head += B * cfg.num_classes * (b + 4)  # logits and their fp32 copy for the loss
        if loss == "sigmoid_xent":
            head += B * cfg.num_classes * 4  # one-hot targets
    stored = stored_blocks + embed + head

    recompute = block if ckpt else 0
    workspace = tok * (D + 2 * Hd) * b  # backward: grad of the block output, fc2-in and fc1-out grads
    fwd_block = T * (4 * D * D + 2 * T * D + 2 * D * Hd)
    total_fwd = L * fwd_block
    frac = (ckpt * fwd_block) / total_fwd if total_fwd else 0.0
    return Activations(block, stored, stored + recompute + workspace, ckpt, frac)


def _hybrid_stem_bytes(cfg: Any, B: int, b: int) -> int:
    from vitscale.models.flops import _conv_out
    from vitscale.models.resnet import STAGE_WIDTHS, STEM_WIDTH

    h, w = cfg.img_hw
    h, w = _conv_out(h, 2), _conv_out(w, 2)
    total = 3 * h * w * STEM_WIDTH
    h, w = _conv_out(h, 2), _conv_out(w, 2)
    for stage, depth in enumerate(cfg.stem_layers):
        out = STAGE_WIDTHS[stage]
        for blk in range(depth):
            s = 2 if (blk == 0 and stage > 0) else 1
            h, w = _conv_out(h, s), _conv_out(w, s)
            total += 3 * h * w * (out // 4 * 2 + out)
    return B * total * b


# ------------------------------------------------------------------------------- from the config
def param_groups_numel(cfg: Any) -> tuple[list[list[int]], int, Any]:
    """(optimizer param groups as numel lists, largest block's numel, ModelConfig) for the training
    config, from a model built on the meta device (no memory, exact shapes and order)."""
    import torch

    from vitscale.config import resolve_model
    from vitscale.engine.optim import param_groups
    from vitscale.models import create_model
    from vitscale.models.registry import ModelConfig

    source = cfg.finetune.get("source")
    kwargs = resolve_model(cfg, int(cfg.finetune.num_classes if source else cfg.data.num_classes)).to_dict()
    if source:
        kwargs["representation_size"] = None  # reset_head drops the pre-logits layer
    with torch.device("meta"):
        model = create_model(**kwargs)
    groups = param_groups(model, float(cfg.optim.weight_decay), bool(cfg.optim.get("decay_1d_params", True)))
    numels = [[int(p.numel()) for p in g["params"]] for g in groups]
    numels = [g for g in numels if g]  # DeepSpeed drops empty groups
    largest = max((sum(p.numel() for p in blk.parameters()) for blk in model.blocks), default=0)
    mcfg = ModelConfig(**model.config)
    return numels, int(largest), mcfg


def model_states_for_cfg(cfg: Any, world: int, *, precision: str, zero: Mapping[str, Any] | None = None,
                         rank: int | None = None) -> ModelStates:
    """``model_states`` for a composed training config (its model, optimizer and ZeRO block)."""
    from omegaconf import OmegaConf

    groups, largest, _ = param_groups_numel(cfg)
    if zero is None:
        zero = OmegaConf.to_container(cfg.deepspeed.zero_optimization, resolve=True)
    assert isinstance(zero, dict)
    return model_states(groups, stage=int(zero.get("stage", 0)), precision=precision, world=world,
                        optimizer=str(cfg.optim.name), momentum=cfg.optim.get("momentum"),
                        zero=zero, largest_module=largest, rank=rank)
