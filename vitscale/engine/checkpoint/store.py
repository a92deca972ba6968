"""Writing and reading checkpoints: DeepSpeed's save/load plus vitscale's rank files and manifest.

Save protocol (every rank calls ``save``; each numbered step ends in a collective, so a failure on one
rank is known to all and nobody waits for a peer that gave up):
1. rank 0 moves an existing ``<tag>`` directory aside (``checkpoints/replaced/``) unless it is the
   checkpoint this job resumed from, and checks free space against the previous checkpoint's size;
2. DeepSpeed writes its files, each rank its ``rank_<r>.pt``; errors are gathered (a full disk becomes
   ``no space left on <dir>``) and the partial directory is removed;
3. each rank hashes the files it wrote, rank 0 writes ``manifest.json``, then ``latest``, then prunes.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitscale.engine.checkpoint import manifest
from vitscale.engine.checkpoint.errors import CheckpointError, NoSpaceError, one_line
from vitscale.engine.checkpoint.run_config import CONFIG_FILE
from vitscale.engine.checkpoint.layout import LATEST, tag_for, tags
from vitscale.engine.checkpoint.locate import CheckpointRef, from_rank0, gather, group, latest
from vitscale.engine.checkpoint.safe_load import safe_load, weights_only_loads

log = logging.getLogger("vitscale.engine.checkpoint")
REPLACED_DIR = "replaced"
_DISK_FULL = re.compile(r"No space left|Disk quota|iostream error|unexpected pos|file write failed", re.I)
_loaded: set[Path] = set()  # tag directories this process resumed from (saving one again is a no-op)
_written: set[Path] = set()  # tag directories this process wrote (replacing one is this job's decision)


# ------------------------------------------------------------------------------------------- errors
def describe_write_error(exc: BaseException, where: Path) -> str:
    """One line for a failed write; a full disk (ENOSPC/EDQUOT, or the RuntimeErrors torch.save raises
    for it: ``write(): ... No space left``, ``unexpected pos``, ``basic_ios::clear: iostream error``)
    is named as such when the file system confirms it."""
    code = getattr(exc, "errno", None)
    disk_like = code in (errno.ENOSPC, errno.EDQUOT) or bool(_DISK_FULL.search(str(exc)))
    if disk_like:
        free, total = _space(where)
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "quota" in str(exc).lower() \
                or free < max(64 << 20, total // 20):
            return (f"no space left on {where} ({_size(free)} free of {_size(total)}): the checkpoint was "
                    f"not written; free space or lower trainer.keep_checkpoints, then resume")
    return f"saving checkpoint in {where} failed: {type(exc).__name__}: {one_line(exc, 200)}"


def _space(where: Path) -> tuple[int, int]:
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return usage.free, usage.total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------------- prepare
def _prepare(ref: CheckpointRef) -> str | None:
    """Rank 0: make room for ``ref`` (never overwriting another checkpoint) and check free space.
    Returns an error line or None."""
    try:
        if ref.path.resolve() in _written:
            shutil.rmtree(ref.path)  # this job's own earlier save of the same step: replaced on purpose
        elif ref.path.exists():
            _move_aside(ref)
        previous = latest(ref.root)
        need = 0
        if previous is not None:
            body = manifest.read(previous.path)
            need = int(body.get("total_bytes", 0)) if isinstance(body, dict) else 0
        free, total = _space(ref.root)
        if need and free < need:
            return (f"no space left on {ref.root}: {_size(free)} free of {_size(total)}, the previous checkpoint "
                    f"took {_size(need)}; nothing was written; free space or lower trainer.keep_checkpoints")
        ref.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return describe_write_error(exc, ref.root)
    return None


def _move_aside(ref: CheckpointRef) -> None:
    """An existing ``<tag>`` was not written by this job (another run, an unfinished save, a checkpoint
    resume=auto skipped): keep it under ``replaced/`` rather than overwrite it, and say so."""
    body = manifest.read(ref.path)
    state = "incomplete (no manifest.json)" if isinstance(body, manifest.Problem) else "with a manifest"
    dest = ref.root / REPLACED_DIR / f"{ref.tag}-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{ref.tag}-{time.strftime('%Y%m%dT%H%M%S')}-{n}"), n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(ref.path, dest)
    log.warning("checkpoint %s already exists, %s, not written by this job: moved it to %s instead of "
                "overwriting it", ref.path, state, dest)


# -------------------------------------------------------------------------------------------- save
def save(engine: Any, root: Path, step: int, *, rank: int, client_state: dict[str, Any],
         rank_state: dict[str, Any], keep: int, train_config: str | None = None) -> CheckpointRef:
    """Collective: every rank must call it. Returns the checkpoint written (complete, with manifest).

    ``train_config`` (the resolved YAML) goes to ``<tag>/train_config.yaml``, written by rank 0 before
    the manifest, so it is checksummed too; ``resume=auto`` compares it (run_config.py).

    Raises CheckpointError (NoSpaceError for a full disk) on every rank alike, with one line."""
    root = Path(root)
    ref = CheckpointRef(root, tag_for(step))
    if from_rank0(lambda: ref.path.resolve() in _loaded and isinstance(manifest.read(ref.path), dict)):
        log.info("checkpoint %s is the one this job resumed from: not written again", ref.path)
        return ref
    _raise_first(gather(_prepare(ref) if rank == 0 else None), ref, cleanup=False)
    error = None
    try:
        engine.save_checkpoint(str(root), tag=ref.tag, client_state=client_state, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - turned into one line, shared with every rank below
        error = describe_write_error(exc, ref.path)
        _barrier_after_failure()
    if error is None:
        try:
            torch.save(rank_state, ref.path / f"rank_{rank}.pt")
            if rank == 0 and train_config is not None:
                (ref.path / CONFIG_FILE).write_text(train_config)
        except Exception as exc:  # noqa: BLE001
            error = describe_write_error(exc, ref.path)
    _raise_first(gather(error), ref, cleanup=True)
    world = group()[1]
    digests = gather(manifest.digest_own_files(ref.path, group()[0], world))
    status = None
    if rank == 0:
        try:
            files = {name: d for part in digests for name, d in part.items()}
            manifest.write(ref.path, tag=ref.tag, step=step, world_size=world, files=files)
            tmp = root / f"{LATEST}.tmp"
            tmp.write_text(ref.tag)
            os.replace(tmp, root / LATEST)
            if keep > 0:
                prune(root, keep)
        except OSError as exc:
            status = describe_write_error(exc, ref.path)
    _raise_first(gather(status), ref, cleanup=True)
    _written.add(ref.path.resolve())
    return ref


def _barrier_after_failure() -> None:
    """DeepSpeed's save ends in a barrier the other ranks are waiting in; meet them there."""
    if group()[1] > 1:
        dist.barrier()


def _raise_first(errors: list[str | None], ref: CheckpointRef, *, cleanup: bool) -> None:
    """Same decision on every rank: raise the first rank's error (after removing the partial save)."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    rank, text = failed[0]
    if cleanup and group()[0] == 0:
        shutil.rmtree(ref.path, ignore_errors=True)  # ours, unfinished: frees the space it took
    prefix = f"rank {rank}: " if len(errors) > 1 else ""
    cls = NoSpaceError if "no space left" in text else CheckpointError
    raise cls(prefix + text + ("" if not cleanup else f" (partial {ref.tag} removed; `latest` unchanged)"))


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` tags (never the one ``latest`` names). ``replaced/`` is left
    alone: it holds checkpoints this job did not write."""
    current = latest(root)
    for old in tags(root)[:-keep]:
        if current is None or old != current.tag:
            shutil.rmtree(root / old, ignore_errors=True)


# -------------------------------------------------------------------------------------------- load
def load(engine: Any, ref: CheckpointRef, *, rank: int, written_world: int | None = None,
         universal: CheckpointRef | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores engine (weights, optimizer, LR schedule); returns (client, rank) state.

    ``universal`` (elastic.universal_ref): load DeepSpeed's universal conversion of ``ref`` instead of
    its partitions; the engine must have been built with ``checkpoint.load_universal``. When the job's
    world size differs from ``written_world``, rank r reads ``rank_{r mod N}.pt`` (its data-stream
    state holds every old rank's positions; its RNG state is not used: see the Trainer).
    Every unpickling (DeepSpeed's included) is weights-only with DeepSpeed's allow-list."""
    from vitscale.engine.schedule import sync_lr_after_load

    world = group()[1]
    n = written_world or world
    rank_file = ref.path / f"rank_{rank % n if n != world else rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file} missing: the checkpoint was not written by vitscale or is incomplete")
    if universal is not None and not engine.load_universal_checkpoint():
        raise CheckpointError("internal: a universal checkpoint needs an engine built with checkpoint.load_universal")
    load_dir, tag = (universal.root, universal.tag) if universal is not None else (ref.root, ref.tag)
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag} (no model states for this rank)")
    sync_lr_after_load(engine)
    _loaded.add(ref.path.resolve())
    return dict(client_state or {}), safe_load(rank_file)
