"""Which checkpoint to load: ``resume=auto`` / a local path -> a verified CheckpointRef.

``resume=auto`` does not trust the ``latest`` file alone (it can be lost, or name a checkpoint that was
corrupted afterwards): it walks the tag directories newest first and takes the first one whose
manifest verifies (manifest.py), warning once per skipped directory with the file at fault. An
explicitly named checkpoint that fails verification is an error naming the file, never a silent
fallback. With a process group of several ranks every function here is collective: rank 0 lists and
reads, all ranks hash their share of the files, and every rank reaches the same decision.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from vitscale.engine.checkpoint import manifest
from vitscale.engine.checkpoint.errors import CheckpointError, CorruptCheckpointError
from vitscale.engine.checkpoint.layout import LATEST, TAG_PREFIX, latest_tag, tags
from vitscale.engine.checkpoint.manifest import Problem

log = logging.getLogger("vitscale.engine.checkpoint")
T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint: the directory holding tags (``root``) and the tag to load."""

    root: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag


# ------------------------------------------------------------------------------------ collectives
def group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable, small), on every rank."""
    _, world = group()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def from_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on rank 0 only and handed to every rank (one view of a shared directory)."""
    rank, world = group()
    value = fn() if rank == 0 else None
    if world == 1:
        return value  # type: ignore[return-value]
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def warn(msg: str, *args: Any) -> None:
    """One line, from rank 0 only (every rank reached the same decision)."""
    if group()[0] == 0:
        log.warning(msg, *args)


def _job_world() -> int | None:
    return group()[1] if dist.is_available() and dist.is_initialized() else None


# ------------------------------------------------------------------------------------------ listing
def latest(root: Path) -> CheckpointRef | None:
    """The checkpoint the ``latest`` file names, if it and its directory exist (not verified)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    if not (root / tag).is_dir():
        log.debug("%s names %s, which is missing", root / LATEST, tag)
        return None
    return CheckpointRef(root, tag)


# ---------------------------------------------------------------------------------------- verifying
def verify(ref: CheckpointRef, *, deep: bool = True) -> Problem | None:
    """None when ``ref`` is complete and (``deep``) every file matches its sha256; else the Problem.

    Collective under a process group: the files are split across ranks for hashing."""
    rank, world = group()
    body = from_rank0(lambda: manifest.read(ref.path))
    if isinstance(body, Problem):
        return body
    problem = manifest.structure_problem(ref.path, body, _job_world())
    if problem is not None:
        return problem
    names = sorted(body["files"])
    local = manifest.check_files(ref.path, body, names[rank::world], deep=deep)
    return next((p for p in gather(local) if p is not None), None)


def newest_intact(root: Path, *, what: str) -> CheckpointRef | None:
    """The newest intact checkpoint under ``root``; None when there is none at all (fresh start).

    Skipped directories get one warning each. Raises CorruptCheckpointError when checkpoints exist
    but every one is corrupt (as opposed to unfinished): starting over would silently discard them.
    """
    names = from_rank0(lambda: tags(root))
    if not names:
        return None
    if not from_rank0(lambda: any((root / t / manifest.MANIFEST).is_file() for t in names)):
        return _newest_legacy(root, names, what=what)
    corrupt: list[Problem] = []
    for tag in reversed(names):
        ref = CheckpointRef(root, tag)
        problem = verify(ref)
        if problem is None:
            return ref
        kind = "incomplete" if problem.incomplete else "corrupt"
        warn("%s: skipping %s checkpoint %s: %s; trying an older one", what, kind, ref.path, problem)
        if not problem.incomplete:
            corrupt.append(problem)
    if corrupt:
        raise CorruptCheckpointError(
            f"{what}: no intact checkpoint in {root} ({len(names)} found; newest corrupt: {corrupt[0]}); "
            f"move the bad ones away, or pass resume=null to start over")
    warn("%s: none of the %d checkpoints in %s finished saving; starting fresh", what, len(names), root)
    return None


def _newest_legacy(root: Path, names: list[str], *, what: str) -> CheckpointRef | None:
    """A checkpoint directory from before manifests: ``latest``, else the newest whole-looking tag."""
    current = latest(root)
    candidates = [current.tag] if current is not None else list(reversed(names))
    for tag in candidates:
        problem = from_rank0(lambda: manifest.legacy_problem(root / tag))
        if problem is None:
            warn("%s: %s has no checksum manifest (written before vitscale verified checkpoints); "
                 "loading it unverified", what, root / tag)
            return CheckpointRef(root, tag)
        warn("%s: skipping incomplete checkpoint %s: %s", what, root / tag, problem)
    return None


def _explicit(ref: CheckpointRef, what: str) -> CheckpointRef:
    """A checkpoint the user named: it verifies, or one error line says which file is wrong."""
    if not from_rank0(ref.path.is_dir):
        raise CheckpointError(f"{what}: {ref.path} does not exist")
    problem = verify(ref)
    if problem is None:
        return ref
    if problem.incomplete and not from_rank0(lambda: any(ref.root.glob(f"{TAG_PREFIX}*/{manifest.MANIFEST}"))):
        legacy = from_rank0(lambda: manifest.legacy_problem(ref.path))
        if legacy is None:
            warn("%s: %s has no checksum manifest (written before vitscale verified checkpoints); "
                 "loading it unverified", what, ref.path)
            return ref
        problem = legacy
    raise CorruptCheckpointError(f"{what}: checkpoint {ref.path} is not usable: {problem}")


# ---------------------------------------------------------------------------------------- resolving
def resolve(resume: str | Path | None, output_dir: Path, *, what: str | None = None) -> CheckpointRef | None:
    """``resume`` -> what to load: ``auto`` (newest intact checkpoint in output_dir/checkpoints, or
    None) or a local path (a checkpoint root, or one tag directory). ``runs:/ID`` was resolved to a
    local path by the entry point (vitscale/start.py); ``what`` names the user's spelling in messages.
    Collective under a process group."""
    if resume in (None, "", "none", "null", False):
        return None
    if resume == "auto":
        return newest_intact(Path(output_dir) / "checkpoints", what="resume=auto")
    what = what or f"resume={resume}"
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    tag = latest_tag(path)
    if tag is not None:
        marker = path / LATEST
        if not (path / tag).is_dir():
            raise CheckpointError(f"{what}: {marker} names {tag!r}, which is not a directory in {path}")
        return _explicit(CheckpointRef(path, tag), what)
    if (path / manifest.MANIFEST).is_file() or any(path.glob("*model_states.pt")):
        return _explicit(CheckpointRef(path.parent, path.name), what)
    if tags(path):
        found = newest_intact(path, what=what)
        if found is not None:
            return found
        raise CheckpointError(f"{what}: none of the checkpoints in {path} is complete")
    raise FileNotFoundError(
        f"{what}: {path} is neither a checkpoint root (with a 'latest' file or step_* directories) "
        f"nor a DeepSpeed tag directory (with *model_states.pt)")
