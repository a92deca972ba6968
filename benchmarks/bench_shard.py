"""Sharder pass-through throughput vs plain `tar cf` of the same files, measured in one run.

Corpus: foolbox's 20 real ImageNet JPEGs copied into an ImageFolder tree of --files files (real
copies: tar would store hard links as links). Like with like:
  - the same files, page cache warm for both (every file is read once before timing), both
    read every byte and write one output to the same folder of the same filesystem;
  - outputs are deleted and dirty pages flushed (`sync`) before every timed run, outside the timer;
  - two pairs: `page cache` = `tar cf` vs `data_tools.shard --no-fsync` (neither waits for the
    disk), and `durable` = `tar cf && sync FILE` (coreutils fsyncs the tar) vs the sharder's
    default (fsync of every shard before its rename);
  - the sharder runs in this process (its interpreter start-up, ~0.5 s of imports, is left out;
    `tar`'s process start-up is ~1 ms), listing and planning the tree included as tar walks it too.
The sharder does more than tar: it checks every image header and JPEG end marker, writes `cls`
and `json` members per sample and sha256-hashes every byte it writes (for the manifest).
Rounds alternate so load from other jobs hits all contenders alike; best and median are printed,
wall clock and CPU time (user + sys, all threads and child processes). Goal: ratio >= 0.7.

    .venv/bin/python benchmarks/bench_shard.py [--files 3000] [--rounds 5] [--workers 1] [--samples-per-shard 500]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data_tools.shard import main as shard_main


def foolbox_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("foolbox is not installed: `make setup` installs it (pip install --no-deps foolbox==3.3.4)")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("imagenet_*.jpg"))


def build_tree(root: Path, files: int, per_class: int = 100) -> int:
    jpegs = foolbox_jpegs()
    total = 0
    for i in range(files):
        dest = root / f"class{i // per_class:04d}" / f"img{i:06d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(jpegs[i % len(jpegs)], dest)
        total += dest.stat().st_size
    for p in root.rglob("*.jpg"):  # warm the page cache for both contenders
        p.read_bytes()
    return total


def cpu_seconds() -> float:
    """User + system time of this process (all threads) and of its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_rounds(rounds: int, contenders: dict[str, tuple[Callable[[], None], Callable[[], None]]]) -> dict:
    """{name: ([wall...], [cpu...])}; each contender's `reset` (untimed) runs before its timed `run`."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in contenders}
    for r in range(rounds):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            reset, run = contenders[name]
            reset()
            os.sync()  # no dirty pages left over from the previous contender
            wall, cpu = time.perf_counter(), cpu_seconds()
            run()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(cpu_seconds() - cpu)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="sharder processes (tar is one process)")
    p.add_argument("--samples-per-shard", type=int, default=500)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        tmpdir = Path(tmp)
        src, out, plain = tmpdir / "src", tmpdir / "shards", tmpdir / "plain.tar"
        nbytes = build_tree(src, args.files)

        def clear() -> None:
            shutil.rmtree(out, ignore_errors=True)
            plain.unlink(missing_ok=True)

        def tar(durable: bool) -> Callable[[], None]:
            def run() -> None:
                subprocess.run(["tar", "cf", str(plain), "-C", str(src), "."], check=True)
                if durable:
                    subprocess.run(["sync", str(plain)], check=True)
            return run

        def shard(durable: bool) -> Callable[[], None]:
            def run() -> None:
                assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--workers", str(args.workers),
                                   "--samples-per-shard", str(args.samples_per_shard),
                                   *([] if durable else ["--no-fsync"])]) == 0
            return run

        contenders = {"tar cf": (clear, tar(False)), "shard --no-fsync": (clear, shard(False)),
                      "tar cf && sync FILE": (clear, tar(True)), "shard (fsync per shard)": (clear, shard(True))}
        times = time_rounds(args.rounds, contenders)
    mb = nbytes / 1e6
    print(f"corpus: {args.files} JPEGs, {mb:.0f} MB, page cache warm; sharder workers={args.workers}; "
          f"{args.rounds} alternating rounds")
    print(f"{'':28s} {'wall best':>9s} {'median':>7s} {'MB/s best':>9s} {'CPU best':>8s} {'median':>7s}")
    for name, (wall, cpu) in times.items():
        print(f"{name:28s} {min(wall):8.3f}s {statistics.median(wall):6.3f}s {mb / min(wall):9.0f} "
              f"{min(cpu):7.3f}s {statistics.median(cpu):6.3f}s")
    for label, t, s in (("page cache", "tar cf", "shard --no-fsync"),
                        ("durable   ", "tar cf && sync FILE", "shard (fsync per shard)")):
        (tw, tc), (sw, sc) = times[t], times[s]
        print(f"ratio shard/tar, {label}: wall best {min(tw) / min(sw):.2f}x, median "
              f"{statistics.median(tw) / statistics.median(sw):.2f}x; CPU best {min(tc) / min(sc):.2f}x")
    print("goal: ratio >= 0.7x")


if __name__ == "__main__":
    main()
