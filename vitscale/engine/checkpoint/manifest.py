"""Checksum manifests: what makes a checkpoint *complete*, and how a corrupt one is recognised.

A tag directory is **complete** when ``manifest.json`` exists, parses, and lists
- ``rank_<r>.pt`` for every rank ``r < world_size`` (vitscale's per-rank RNG/data state),
- at least one DeepSpeed ``*model_states.pt`` (plus whatever optimizer partitions DeepSpeed wrote),
and every listed file is present with the recorded size. It is **intact** when, in addition, every
file's sha256 matches. The manifest is written by rank 0 after all ranks finished writing (a barrier
and a gather of per-rank digests), and before ``latest`` moves, so a save that dies at any moment
leaves a directory without a manifest: incomplete, never picked by ``resume=auto``.

Why sha256: measured on this project's CPUs, ``hashlib.file_digest`` hashes page-cached files at
1.23 GB/s per core with sha256 (SHA-NI), against 1.74 GB/s for zlib.crc32 and 0.50 GB/s for blake2b
(reading alone: 10.4 GB/s). A 1.4x faster checksum is not worth a weaker one, and each rank hashes only
the files it wrote (save) or its share of the files (verify), so the cost is split across ranks:
~8 s for a 10 GB ZeRO checkpoint over one rank, a second or so over eight.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitscale.engine.checkpoint.layout import MANIFEST  # re-exported: manifest.MANIFEST

FORMAT = "vitscale-checkpoint-manifest/1"
HASH = "sha256"
_OWNER = re.compile(r"(?:^|_)rank_(\d+)[_.]")  # rank_3.pt, zero_pp_rank_3_..., bf16_zero_pp_rank_3_...


@dataclass(frozen=True)
class Problem:
    """Why a checkpoint cannot be used: the file concerned and one line of explanation."""

    file: Path
    text: str
    incomplete: bool = False  # no manifest: a save that did not finish (as opposed to a corrupt one)

    def __str__(self) -> str:
        return f"{self.file}: {self.text}"


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, HASH).hexdigest()


def owner(relpath: str, world_size: int) -> int:
    """The rank that wrote a checkpoint file, from DeepSpeed's and vitscale's naming (rank 0 otherwise).

    Each rank hashes what it wrote, so the save's hashing is split over ranks, and files on a
    node-local disk are hashed by the node that holds them."""
    found = _OWNER.search(Path(relpath).name)
    rank = int(found[1]) if found else 0
    return rank if rank < world_size else 0


def files_of(tag_dir: Path) -> list[str]:
    """Every regular file under ``tag_dir`` (relative, posix), the manifest itself excluded."""
    out = []
    for path in sorted(tag_dir.rglob("*")):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.endswith(".tmp"):
            out.append(rel)
    return out


def digest_own_files(tag_dir: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """{relpath: {size, sha256}} for the files of ``tag_dir`` this rank wrote."""
    out = {}
    for rel in files_of(tag_dir):
        if owner(rel, world_size) == rank:
            path = tag_dir / rel
            out[rel] = {"size": path.stat().st_size, HASH: file_digest(path)}
    return out


def write(tag_dir: Path, *, tag: str, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> Path:
    """Atomically write ``tag_dir/manifest.json`` (temp file + fsync + rename)."""
    body = {"format": FORMAT, "tag": tag, "step": step, "world_size": world_size, "hash": HASH,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "total_bytes": sum(f["size"] for f in files.values()),
            "files": dict(sorted(files.items()))}
    tmp = tag_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, tag_dir / MANIFEST)
    return tag_dir / MANIFEST


def read(tag_dir: Path) -> dict[str, Any] | Problem:
    """The parsed manifest, or the Problem that makes the directory unusable."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        return Problem(path, "missing: the save did not finish (or the checkpoint predates checksum manifests)",
                       incomplete=True)
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return Problem(path, f"unreadable ({type(exc).__name__}); expected the JSON manifest vitscale writes")
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
        return Problem(path, f"not a vitscale manifest (expected format {FORMAT!r})")
    return body


def structure_problem(tag_dir: Path, body: dict[str, Any], world_size: int | None) -> Problem | None:
    """What the manifest lists must make a whole checkpoint (of the world size that wrote it).

    ``world_size`` (this job's) is not required to match: a checkpoint of another world size resumes
    through DeepSpeed's universal checkpoint (elastic.py)."""
    files, written_by = body["files"], int(body.get("world_size", 0))
    missing = [f"rank_{r}.pt" for r in range(written_by) if f"rank_{r}.pt" not in files]
    if not any(name.endswith("model_states.pt") for name in files):
        missing.append("*model_states.pt")
    if missing:
        return Problem(tag_dir / MANIFEST, f"lists no {', '.join(missing[:4])}; expected every rank's files")
    return None


def check_files(tag_dir: Path, body: dict[str, Any], names: list[str], *, deep: bool) -> Problem | None:
    """Presence, size and (``deep``) sha256 of ``names`` against the manifest; the first problem."""
    algo = body.get("hash", HASH)
    for name in names:
        want = body["files"][name]
        path = tag_dir / name
        if not path.is_file():
            return Problem(path, "missing (listed in manifest.json)")
        size = path.stat().st_size
        if size != want["size"]:
            return Problem(path, f"is {size} bytes, manifest.json says {want['size']} (truncated or rewritten)")
        if deep:
            with open(path, "rb") as fh:
                got = hashlib.file_digest(fh, algo).hexdigest()
            if got != want[algo]:
                return Problem(path, f"{algo} {got[:12]}... differs from manifest.json's {want[algo][:12]}... "
                                     f"(the file changed or is corrupt)")
    return None


def legacy_problem(tag_dir: Path) -> Problem | None:
    """For directories from before manifests: the layout a finished vitscale save has (unverifiable)."""
    ranks = sorted(int(m[1]) for p in tag_dir.glob("rank_*.pt") if (m := re.fullmatch(r"rank_(\d+)\.pt", p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        return Problem(tag_dir, f"rank files {ranks or 'none'}; expected rank_0.pt ... rank_N.pt", incomplete=True)
    if not any(tag_dir.glob("*model_states.pt")):
        return Problem(tag_dir, "no DeepSpeed *model_states.pt", incomplete=True)
    optim = list(tag_dir.glob("*optim_states.pt"))
    if optim and len(optim) != len(ranks):
        return Problem(tag_dir, f"{len(optim)} optimizer partitions for {len(ranks)} ranks", incomplete=True)
    return None
