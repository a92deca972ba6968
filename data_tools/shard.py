"""`python -m data_tools.shard --src SRC --out OUT`: image corpus -> WebDataset shards.

Output: `OUT/<prefix>-NNNNNN.tar` (or `<prefix>-train-…` / `<prefix>-val-…` with --val-fraction),
`OUT/manifest.json`, `OUT/errors.jsonl`. Same input + options -> byte-identical shards for any
--workers; an interrupted run (even kill -9) is finished by rerunning the same command.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from data_tools.plan import TOOL_VERSION, ShardPlan, brace_pattern, plan_shards
from data_tools.sources import Source, SourceError, fingerprint, open_source, parse_class_names
from data_tools.writer import (TMP_DIR, PendingShard, ShardResult, WriteOptions, atomic_write_text,
                               load_completed, remove_temporaries, start_shard, write_shard)

_worker_source: Source | None = None  # set per writer process (inherited with fork)


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _write_task(task: tuple[ShardPlan, Path, WriteOptions, list[str]]) -> ShardResult:
    plan, out, opts, class_names = task
    assert _worker_source is not None
    return write_shard(_worker_source, plan, out, opts, class_names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True,
                   help="ImageFolder root, .csv/.jsonl manifest (path,label[,extra]) or IDX images file")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--labels", type=Path, help="IDX labels file (default: derived from the images file name)")
    p.add_argument("--split", choices=["train", "test"], help="CIFAR-10/100 folder: which split to shard")
    p.add_argument("--class-names", help="comma-separated names, or a file with one name per line")
    p.add_argument("--prefix", default="data", help="shard name prefix (default: data)")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--max-shard-bytes", type=float, default=1e9,
                   help="close a shard before it would exceed this many bytes (planned from file sizes)")
    p.add_argument("--workers", type=int, default=1, help="writer processes (output does not depend on it)")
    p.add_argument("--resize-short-side", type=int,
                   help="re-encode images whose short side exceeds this, resized down to it")
    p.add_argument("--reencode", action="store_true", help="re-encode every image (JPEG stays JPEG)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--check", choices=["structure", "decode"], default="structure",
                   help="structure: headers, PNG CRCs, JPEG end marker (fast); decode: every pixel")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hash-based deterministic val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split and the sample shuffle")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep listing order (ImageFolder order makes class-pure shards: avoid for training)")
    p.add_argument("--no-fsync", action="store_true",
                   help="skip the fsync before each shard's rename: still atomic and resumable after a crash or "
                        "kill -9 of this process, but a power loss or OS crash may leave shards that "
                        "`python -m data_tools.verify` rejects (delete them and rerun)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _lock(out: Path):
    handle = open(out / ".shard.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: {out} is being written by another data_tools.shard process") from None
    return handle


def _warn_about_old_temporaries(out: Path, plans: list[ShardPlan]) -> None:
    """Tool versions before 3 left `<shard>.tmp-<pid>` in OUT itself. Such a file cannot be proven
    to be ours (a user may keep files there), so it is named, never deleted."""
    planned = {p.name for p in plans}
    old = sorted(p.name for p in out.glob("*.tmp-*")
                 if p.name.rsplit(".tmp-", 1)[0] in planned and p.name.rsplit(".tmp-", 1)[1].isdigit())
    if old:
        print(f"warning: {len(old)} file(s) in {out} look like temporaries of an older data_tools.shard and are not "
              f"deleted (delete them yourself if so): {', '.join(old[:5])}{' ...' if len(old) > 5 else ''}",
              file=sys.stderr)


def _run_plans(source: Source, todo: list[ShardPlan], out: Path, opts: WriteOptions,
               class_names: list[str], workers: int, bar: tqdm):
    tasks = [(plan, out, opts, class_names) for plan in todo]
    if workers <= 1 or len(tasks) <= 1:
        # One shard in flight behind the current one: its fsync runs while the next is read.
        pending: tuple[PendingShard, int] | None = None
        for plan, *_ in tasks:
            current = (start_shard(source, plan, out, opts, class_names), len(plan.items))
            if pending is not None:
                yield pending[0].finish()
                bar.update(pending[1])
            pending = current
        if pending is not None:
            yield pending[0].finish()
            bar.update(pending[1])
        return
    ctx = mp.get_context("fork")  # children inherit the listing (and any loaded IDX arrays)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(source,)) as pool:
        for result, t in zip(pool.imap(_write_task, tasks), tasks):
            bar.update(len(t[0].items))
            yield result


def build_manifest(source: Source, plans: list[ShardPlan], results: dict[str, ShardResult],
                   options: dict) -> dict:
    splits: dict[str, dict] = {}
    for plan in plans:
        r = results[plan.name]
        s = splits.setdefault(plan.split, {"num_samples": 0, "num_rejected": 0, "bytes": 0, "shards": []})
        s["shards"].append({"name": r.name, "num_samples": r.num_samples, "bytes": r.bytes, "sha256": r.sha256})
        s["num_samples"] += r.num_samples
        s["num_rejected"] += r.num_rejected
        s["bytes"] += r.bytes
    for s in splits.values():
        s["num_shards"] = len(s["shards"])
        s["pattern"] = brace_pattern([sh["name"] for sh in s["shards"]])
    # No timestamps: the manifest is as reproducible as the shards it describes.
    return {
        "tool": "data_tools.shard", "tool_version": TOOL_VERSION,
        "source": {"path": str(source.root), "kind": source.kind, "fingerprint": fingerprint(source),
                   "num_items": len(source.items)},
        "options": options,
        "class_names": source.class_names, "num_classes": len(source.class_names),
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_rejected": sum(s["num_rejected"] for s in splits.values()),
        "num_shards": len(plans),
        "splits": splits,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source = open_source(args.src, labels=args.labels, class_names=parse_class_names(args.class_names),
                             split=args.split)
    except (SourceError, OSError) as e:  # OSError: e.g. a source file that cannot be read at all
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = WriteOptions(args.check, args.resize_short_side, args.reencode, args.quality, fsync=not args.no_fsync)
    # Only what changes the shard bytes goes into the manifest and the plan digest (fsync does not).
    options = {**{k: v for k, v in asdict(opts).items() if k != "fsync"}, "samples_per_shard": args.samples_per_shard,
               "max_shard_bytes": int(args.max_shard_bytes), "val_fraction": args.val_fraction,
               "seed": args.seed, "shuffle": not args.no_shuffle, "prefix": args.prefix}
    try:
        plans = plan_shards(source.items, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                            max_shard_bytes=int(args.max_shard_bytes) or None, val_fraction=args.val_fraction,
                            seed=args.seed, shuffle=not args.no_shuffle, options=options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out: Path = args.out
    try:
        (out / TMP_DIR).mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as e:
        print(f"error: --out {out}: cannot create or lock it ({e.strerror or e})", file=sys.stderr)
        return 2
    _warn_about_old_temporaries(out, plans)
    try:
        return _write(args, source, plans, options, opts, out)
    except OSError as e:  # disk full, read-only or vanished output: one line, no temporaries left behind
        remove_temporaries(out)
        done = sum(load_completed(out, plan) is not None for plan in plans)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: writing {out}: {e.strerror or e}{where}; temporary files removed, {done} of {len(plans)} "
              "shards complete and kept: fix the cause and rerun the same command to finish", file=sys.stderr)
        return 1
    except BaseException:
        remove_temporaries(out)  # Ctrl-C, a bug: never leave partial shards behind either
        raise
    finally:
        lock.close()


def _write(args: argparse.Namespace, source: Source, plans: list[ShardPlan], options: dict, opts: WriteOptions,
           out: Path) -> int:
    remove_temporaries(out)  # of a killed run: only ever files in our own .shard-state/tmp/
    results: dict[str, ShardResult] = {}
    todo = []
    for plan in plans:
        done = load_completed(out, plan)
        if done is not None:
            results[plan.name] = done
        else:
            todo.append(plan)
    total = sum(len(p.items) for p in todo)
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc=f"sharding {args.src.name}", disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for r in _run_plans(source, todo, out, opts, source.class_names, args.workers, bar):
            results[r.name] = r
    elapsed = time.perf_counter() - start

    manifest = build_manifest(source, plans, results, options)
    unlisted = list(getattr(source, "unlisted", []))
    manifest["num_unlisted"] = len(unlisted)
    errors = [json.dumps(rej, sort_keys=True) for plan in plans for rej in results[plan.name].rejects]
    errors += [json.dumps({**entry, "shard": None}, sort_keys=True) for entry in unlisted]
    atomic_write_text(out, out / "errors.jsonl", "".join(line + "\n" for line in errors))
    atomic_write_text(out, out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    written = sum(results[p.name].num_samples for p in todo)
    rejected = manifest["num_rejected"] + len(unlisted)
    nbytes = sum(s["bytes"] for s in manifest["splits"].values())
    print(f"shard: {manifest['num_samples']} images in {len(plans)} shards ({nbytes / 1e6:.1f} MB) -> {out}; "
          f"{rejected} rejected (errors.jsonl); this run wrote {written} images in {len(todo)} shards "
          f"({len(plans) - len(todo)} already complete) at {written / max(elapsed, 1e-9):.0f} images/s")
    planned = {p.name for p in plans}
    stale = sorted(p.name for p in out.glob("*.tar") if p.name not in planned)
    if stale:
        print(f"warning: {len(stale)} tar file(s) in {out} are not part of this plan (an earlier run with other "
              f"options?) and not in manifest.json: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
