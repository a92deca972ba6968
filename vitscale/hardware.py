"""Accelerators the planner (and the engine's MFU) know: memory and dense peak FLOP/s per precision.

Pure data, no torch and nothing from vitscale.engine, so anything may import it. Peaks are the
vendors' dense (no 2:4 sparsity) tensor-core numbers for bf16/fp16; ``fp32`` is plain FP32 (not
TF32, which torch leaves off for matmuls by default). ``memory`` is what ``nvidia-smi`` /
``rocm-smi`` reports as total device memory, in bytes; the CUDA context and allocator
fragmentation come out of it, which is what the planner's headroom is for.
``link_gbps`` is the default intra-node bandwidth per GPU and direction in GB/s (NVLink / xGMI /
PCIe), used when the plan does not state one.

Extend or override from a config: ``plan.gpu_table.my_gpu={memory_gib: 94, bf16: 835e12, ...}``
(see :func:`register_gpus`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int                     # bytes
    bf16: float                     # dense peak FLOP/s; 0.0 = not supported
    fp16: float
    fp32: float
    link_gbps: float = 25.0         # intra-node GB/s per GPU and direction (NVLink; PCIe gen4 ~25)
    aliases: tuple[str, ...] = field(default=())
    note: str = ""

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s for ``bf16`` | ``fp16`` | ``fp32`` (0.0 when unsupported)."""
        if precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision {precision!r}: expected bf16, fp16 or fp32")
        return float(getattr(self, precision))

    @property
    def memory_gib(self) -> float:
        return self.memory / GiB


def _gpu(name: str, mem_mib: int, bf16: float, fp16: float, fp32: float, link: float,
         aliases: tuple[str, ...] = (), note: str = "") -> GPU:
    return GPU(name, mem_mib * MiB, bf16, fp16, fp32, link, aliases, note)


# Total memory as nvidia-smi reports it (MiB); dense peaks from the data sheets (SXM unless named).
_BUILTIN: tuple[GPU, ...] = (
    _gpu("a100-40gb", 40960, 312e12, 312e12, 19.5e12, 300.0, ("a100", "a100-sxm4-40gb")),
    _gpu("a100-80gb", 81920, 312e12, 312e12, 19.5e12, 300.0, ("a100-sxm4-80gb",)),
    _gpu("h100-80gb", 81559, 989.4e12, 989.4e12, 66.9e12, 450.0, ("h100", "h100-sxm", "h100-sxm5-80gb")),
    _gpu("h100-pcie", 81559, 756.5e12, 756.5e12, 51.2e12, 64.0, ("h100-pcie-80gb",),
         "PCIe gen5 x16 between GPUs unless NVLink bridges are fitted"),
    _gpu("h200", 143771, 989.4e12, 989.4e12, 66.9e12, 450.0, ("h200-141gb", "h200-sxm")),
    _gpu("l40s", 46068, 362.05e12, 362.05e12, 91.6e12, 32.0, ("l40s-48gb",)),
    _gpu("l4", 23034, 121e12, 121e12, 30.3e12, 32.0, ("l4-24gb",)),
    _gpu("a10g", 23028, 125e12, 125e12, 31.2e12, 25.0, ("a10", "a10g-24gb"),
         "the A10 data sheet peak; AWS's A10G clocks lower"),
    _gpu("v100-32gb", 32768, 0.0, 125e12, 15.7e12, 150.0, ("v100",), "no bf16: fp16 or fp32"),
    _gpu("v100-16gb", 16384, 0.0, 125e12, 15.7e12, 150.0),
    _gpu("mi250x", 131072, 383e12, 383e12, 47.9e12, 100.0, (), "per OAM module (two dies)"),
    _gpu("mi300x", 196608, 1307.4e12, 1307.4e12, 163.4e12, 64.0, ("mi300x-192gb",)),
)

GPUS: dict[str, GPU] = {g.name: g for g in _BUILTIN}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


def known_gpus() -> list[str]:
    return sorted(GPUS)


def register_gpus(table: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Add or override entries: ``{name: {memory_gib | memory, bf16, fp16, fp32, link_gbps}}``.

    A partial entry for a known name overrides only the given fields (``{h100-80gb: {bf16: 8e14}}``).
    """
    for name, spec in (table or {}).items():
        spec = dict(spec)
        key = _key(name)
        base = GPUS.get(key) or _lookup_alias(key)
        if "memory_gib" in spec:
            spec["memory"] = int(float(spec.pop("memory_gib")) * GiB)
        fields = {k: spec[k] for k in ("memory", "bf16", "fp16", "fp32", "link_gbps", "note") if k in spec}
        for k in ("bf16", "fp16", "fp32", "link_gbps"):
            if k in fields:
                fields[k] = float(fields[k])
        if "memory" in fields:
            fields["memory"] = int(fields["memory"])
        if base is not None:
            GPUS[key] = replace(base, name=key, **fields)
            continue
        missing = [k for k in ("memory", "bf16", "fp32") if k not in fields]
        if missing:
            raise ValueError(f"gpu {name!r}: a new GPU needs {', '.join(missing)} "
                             "(memory_gib or memory in bytes; dense peak FLOP/s)")
        fields.setdefault("fp16", fields["bf16"])
        GPUS[key] = GPU(name=key, **fields)


def _lookup_alias(key: str) -> GPU | None:
    for gpu in GPUS.values():
        if key in gpu.aliases:
            return gpu
    return None


def get_gpu(name: str) -> GPU:
    """The table entry for ``name`` (case-insensitive; aliases such as ``h100``); ValueError lists the known."""
    key = _key(name)
    gpu = GPUS.get(key) or _lookup_alias(key)
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(known_gpus())} "
                         "(add one with plan.gpu_table.NAME={memory_gib: ..., bf16: ..., fp32: ...})")
    return gpu


def match_device_name(device_name: str) -> GPU | None:
    """Best table entry for a CUDA device name such as ``NVIDIA H100 80GB HBM3`` (None if unknown)."""
    n = device_name.lower()
    if "h200" in n:
        return GPUS.get("h200")
    if "h100" in n:
        return GPUS.get("h100-pcie") if "pcie" in n else GPUS.get("h100-80gb")
    if "a100" in n:
        return GPUS.get("a100-80gb") if "80g" in n else GPUS.get("a100-40gb")
    if "v100" in n:
        return GPUS.get("v100-32gb") if "32g" in n else GPUS.get("v100-16gb")
    for key in ("l40s", "l4", "a10g", "mi300x", "mi250x"):
        if key in n.replace(" ", ""):
            return GPUS.get(key)
    if "a10" in n:
        return GPUS.get("a10g")
    return None


__all__ = ["GPU", "GPUS", "GiB", "get_gpu", "known_gpus", "match_device_name", "register_gpus"]
