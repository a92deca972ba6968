"""Write one planned shard atomically and record what went into it.

Bytes are deterministic: webdataset's TarWriter (see ShardTarWriter) with a fixed mtime, owner and mode,
members in sorted key order, and plan-fixed sample order.
The tar goes to `.shard-state/tmp/<name>.tmp-<pid>`, is fsynced (unless the caller opts out)
and renamed into place only when complete; then a small sidecar (`.shard-state/<name>.json`:
plan digest, sha256, count, rejects) is written, also atomically. Resume trusts a shard only
with a matching sidecar. Temporaries live only in the sharder's own `.shard-state/tmp/`, so
cleaning up never touches a user's file, and a failed write (disk full) removes its temporary
at once instead of leaving it to keep the disk full.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from data_tools.hashed_file import HashedFile
from data_tools.images import RejectedImage, prepare
from data_tools.plan import ShardPlan, sample_key
from data_tools.sources import Source

STATE_DIR = ".shard-state"
TMP_DIR = f"{STATE_DIR}/tmp"  # everything in it was written by data_tools.shard (see remove_temporaries)
COPY_BUFSIZE = 4 << 20  # tarfile copies each member in 16 KiB pieces by default: one piece per image here
FIXED_MTIME = 0  # reproducible tars: no wall-clock time inside
TAR_OWNER = {"user": "root", "group": "root", "mode": 0o444, "mtime": FIXED_MTIME}


@dataclass(frozen=True)
class WriteOptions:
    check: str = "structure"
    resize_short_side: int | None = None
    reencode: bool = False
    quality: int = 95
    fsync: bool = True  # off: a power loss (not a kill) may leave renamed shards that verify rejects


@dataclass
class ShardResult:
    name: str
    split: str
    digest: str
    num_samples: int
    num_rejected: int
    bytes: int
    sha256: str
    rejects: list[dict]
    skipped: bool = False  # already complete from an earlier run


class ShardTarWriter(wds.TarWriter):
    """webdataset's TarWriter writing straight to its file, in GNU tar format.

    Why not the stock one: it opens tarfile in stream mode ("w|"), whose buffer re-slices every
    byte into 10 KiB records (several copies of each image), and it drops its own `format`
    argument, leaving tarfile's PAX default whose per-member header checks cost more than the
    GNU/ustar headers webdataset meant to write. Together: 0.26 -> 0.18 s of tar writing for the
    3000 benchmark JPEGs (benchmarks/bench_shard.py's corpus). The output is a regular tar
    that any reader (tarfile, GNU tar, webdataset) reads; `HashedFile.tell` makes seekless
    "w" mode possible.
    """

    @staticmethod
    def tarmode(fileobj, compress=None) -> str:
        return "w"

    def __init__(self, fileobj: HashedFile, **kwargs) -> None:
        super().__init__(fileobj, encoder=False, **kwargs)
        self.tarstream.format = tarfile.GNU_FORMAT  # long keys become GNU long-name entries
        self.tarstream.copybufsize = COPY_BUFSIZE


def state_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def load_completed(out: Path, plan: ShardPlan) -> ShardResult | None:
    """The earlier result for this shard if its tar is present, its size matches, and it was
    written from the same plan entry; otherwise None (the shard is (re)written)."""
    try:
        rec = json.loads(state_path(out, plan.name).read_text())
        if rec["digest"] == plan.digest and (out / plan.name).stat().st_size == rec["bytes"]:
            return ShardResult(**{**rec, "skipped": True})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def temporary(out: Path, name: str) -> Path:
    return out / TMP_DIR / f"{name}.tmp-{os.getpid()}"


def remove_temporaries(out: Path) -> int:
    """Delete what earlier or failed runs left in `.shard-state/tmp/` (only this tool writes
    there, and the caller holds the output lock); returns how many were deleted."""
    removed = 0
    for p in (out / TMP_DIR).glob("*.tmp-*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write_text(out: Path, path: Path, text: str) -> None:
    """Write `path` (inside `out`) through a temporary in `.shard-state/tmp/`: whole or not at all."""
    tmp = temporary(out, path.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PendingShard:
    """A shard whose bytes are all queued; `finish()` waits for its hash, fsync and close on the
    writer thread, then renames it into place and writes its sidecar."""

    def __init__(self, plan: ShardPlan, out: Path, tmp: Path, sink: HashedFile, count: int, rejects: list[dict],
                 fsync: bool) -> None:
        self.plan, self.out, self.tmp, self.sink, self.count, self.rejects = plan, out, tmp, sink, count, rejects
        self.sha256 = sink.close_async(fsync)

    def finish(self) -> ShardResult:
        try:
            sha256 = self.sha256.result()  # re-raises a failed write (disk full) or fsync
            os.replace(self.tmp, self.out / self.plan.name)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        for r in self.rejects:
            r["shard"] = self.plan.name
        result = ShardResult(self.plan.name, self.plan.split, self.plan.digest, self.count, len(self.rejects),
                             self.sink.size, sha256, self.rejects)
        try:
            atomic_write_text(self.out, state_path(self.out, self.plan.name),
                              json.dumps(asdict(result) | {"skipped": False}, sort_keys=True))
        except BaseException:  # without its sidecar the shard is rewritten anyway: free its space now
            (self.out / self.plan.name).unlink(missing_ok=True)
            raise
        return result


def write_shard(source: Source, plan: ShardPlan, out: Path, opts: WriteOptions, class_names: list[str]) -> ShardResult:
    return start_shard(source, plan, out, opts, class_names).finish()


def start_shard(source: Source, plan: ShardPlan, out: Path, opts: WriteOptions, class_names: list[str]) -> PendingShard:
    """Read, check and queue every sample of `plan`; the caller may start the next shard before
    calling `finish()` on this one, so that this one's fsync overlaps that work."""
    rejects: list[dict] = []
    count = 0
    tmp = temporary(out, plan.name)
    sink = HashedFile(tmp)
    try:
        tw = ShardTarWriter(sink, **TAR_OWNER)
        for item in plan.items:
            if item.error:  # the listing could not use it (unreadable folder, dangling symlink, ...)
                rejects.append({"source": item.ref, "reason": item.error})
                continue
            try:
                data = source.read(item)
            except OSError as e:
                rejects.append({"source": item.ref, "reason": f"unreadable: {e.strerror or e}"})
                continue
            try:
                img = prepare(data, check=opts.check, resize_short_side=opts.resize_short_side,
                              reencode=opts.reencode, quality=opts.quality)
            except RejectedImage as e:
                rejects.append({"source": item.ref, "reason": str(e)})
                continue
            meta = {"source": item.ref, "label": class_names[item.label], "format": img.source_format,
                    "original_size": list(img.original_size), "size": list(img.size), **item.extra}
            tw.write({"__key__": sample_key(item), img.ext: img.data,
                      "cls": str(item.label).encode(),
                      "json": json.dumps(meta, sort_keys=True).encode()})
            count += 1
        tw.close()
    except BaseException:
        sink.abort()
        tmp.unlink(missing_ok=True)
        raise
    return PendingShard(plan, out, tmp, sink, count, rejects, opts.fsync)
