"""Resuming on a different world size: DeepSpeed's universal checkpoint, converted once and cached.

A ZeRO checkpoint (stages 1-3) holds one optimizer partition per rank; DeepSpeed refuses to load it on
another data-parallel size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported"). Its answer is the *universal* checkpoint:
``deepspeed.checkpoint.ds_to_universal`` merges the partitions into one folder per parameter
(``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``) and an engine built with
``checkpoint.load_universal=true`` re-partitions them for its own world size, optimizer states
included. vitscale runs the converter on rank 0 (the others wait in a broadcast), into
``<tag>/universal/`` with its own checksum manifest, so a second resume reuses it.

What it does not do (DeepSpeed 0.19.8, measured on CPU/gloo): the converter reads Adam's
``exp_avg`` / ``exp_avg_sq`` by name, so an optimizer without them (SGD with momentum) cannot be
converted; vitscale says so in one line instead of DeepSpeed's KeyError. ZeRO-0 in fp32 needs no
conversion: its one ``mp_rank_00_model_states.pt`` holds the whole model and optimizer and loads on
any world size.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

from vitscale.engine.checkpoint import manifest
from vitscale.engine.checkpoint.errors import CheckpointError, one_line
from vitscale.engine.checkpoint.locate import CheckpointRef, from_rank0
from vitscale.engine.checkpoint.safe_load import weights_only_loads

log = logging.getLogger("vitscale.engine.checkpoint")
UNIVERSAL = "universal"  # <tag>/universal/: DeepSpeed's universal checkpoint of <tag>
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def universal_info() -> dict[str, Any]:
    """What DeepSpeed's converter requires in a checkpoint's client state (Megatron-DeepSpeed writes
    it; a plain data-parallel model has no tensor/pipeline-parallel patterns, only the version).
    Checkpoints written before vitscale stored it are converted with ``inject_missing_state``."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def written_world_size(ref: CheckpointRef) -> int:
    """How many ranks wrote ``ref``: its manifest's ``world_size``, else (legacy) its rank files."""
    def read() -> int:
        body = manifest.read(ref.path)
        if isinstance(body, dict) and body.get("world_size"):
            return int(body["world_size"])
        return len(list(ref.path.glob("rank_*.pt")))
    return from_rank0(read)


def needs_universal(ref: CheckpointRef) -> bool:
    """True when ``ref`` has per-rank optimizer partitions (ZeRO 1-3, or bf16's partitioned optimizer),
    which only DeepSpeed's universal format can re-partition; ZeRO-0 fp32 loads on any world size."""
    return from_rank0(lambda: any(ref.path.glob("*optim_states.pt")))


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of ``rank`` after an elastic resume at ``step``: rank files of another world size
    cannot be matched to ranks, so every rank's Python/NumPy/torch streams restart from this."""
    digest = hashlib.sha256(f"vitscale-elastic/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def universal_ref(ref: CheckpointRef, *, optimizer: Any) -> tuple[CheckpointRef, str]:
    """Collective. The universal checkpoint of ``ref`` as (load_dir, tag) = (``<tag>``, ``universal``),
    converted by rank 0 unless an intact cached conversion exists; plus what happened, for the log."""
    missing = [k for k in _ADAM_KEYS if not _optimizer_has(optimizer, k)]
    if missing:
        raise CheckpointError(
            f"{ref.path}: cannot resume on a different world size with {type(optimizer).__name__}: DeepSpeed's "
            f"universal checkpoint converter (ds_to_universal) only carries Adam's exp_avg/exp_avg_sq optimizer "
            f"states; resume with the checkpoint's world size, or use an Adam-family optimizer")
    status = from_rank0(lambda: _convert_or_reuse(ref))
    if status.startswith("error:"):
        raise CheckpointError(status[len("error:"):].strip())
    return CheckpointRef(ref.path, UNIVERSAL), status


def _optimizer_has(optimizer: Any, key: str) -> bool:
    """Adam-family (torch Adam/AdamW/fused, DeepSpeed's CPU Adam) keeps exp_avg/exp_avg_sq; SGD does not."""
    name = type(optimizer).__name__.lower()
    return "adam" in name or "lamb" in name


def _convert_or_reuse(ref: CheckpointRef) -> str:
    """Rank 0: reuse ``<tag>/universal`` when its manifest verifies, else convert. Returns a status line."""
    out = ref.path / UNIVERSAL
    body = manifest.read(out)
    if isinstance(body, dict):
        problem = manifest.check_files(out, body, sorted(body["files"]), deep=True)
        if problem is None:
            return f"reused the universal checkpoint cached in {out}"
        log.warning("universal checkpoint cache %s is not usable (%s): converting again", out, problem)
    for stale in ref.path.glob(f"{UNIVERSAL}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ref.path / f"{UNIVERSAL}.tmp-{os.getpid()}"
    captured = io.StringIO()
    try:
        from deepspeed.checkpoint import ds_to_universal

        args = Namespace(input_folder=str(ref.path), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        # The converter prints and draws tqdm bars: kept for an error message, not for the log.
        with weights_only_loads(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            ds_to_universal.main(args)
        (ref.path / "latest_universal").unlink(missing_ok=True)  # the converter's; vitscale names the tag
        files = manifest.digest_own_files(tmp, 0, 1)
        body = manifest.read(ref.path)
        step = int(body.get("step", 0)) if isinstance(body, dict) else 0
        manifest.write(tmp, tag=UNIVERSAL, step=step, world_size=int(body.get("world_size", 0))
                       if isinstance(body, dict) else 0, files=files)
        os.replace(tmp, out)
    except Exception as exc:  # noqa: BLE001 - one line for every rank (the others wait in the broadcast)
        shutil.rmtree(tmp, ignore_errors=True)
        (ref.path / "latest_universal").unlink(missing_ok=True)
        tail = one_line(captured.getvalue()[-300:], 200)
        return (f"error: converting {ref.path} to DeepSpeed's universal checkpoint failed: {type(exc).__name__}: "
                f"{one_line(exc, 200)}" + (f" (converter output: {tail})" if tail else ""))
    n = len(list((out / "zero").iterdir()))
    return f"converted it with DeepSpeed's ds_to_universal into {out} ({n} parameters, optimizer states included)"
