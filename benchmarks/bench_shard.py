"""Sharder pass-through throughput vs plain `tar cf` of the same files, measured in one run.

Corpus: foolbox's 20 real ImageNet JPEGs copied into an ImageFolder tree of --files files (real
copies: tar would store hard links as links). Page cache is warmed first, so both sides read
from memory and the ratio compares the writers. Goal: ratio >= 0.7.

    .venv/bin/python benchmarks/bench_shard.py [--files 3000] [--repeats 3] [--workers 1] [--samples-per-shard 500]
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import tempfile
import time
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


def best_of_interleaved(repeats: int, *fns) -> list[float]:
    """Best time of each function, run alternately so a load change on a shared machine hits
    both contenders alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="sharder processes (tar is one process)")
    p.add_argument("--samples-per-shard", type=int, default=500)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "src"
        nbytes = build_tree(src, args.files)

        def run_tar() -> None:
            subprocess.run(["tar", "cf", str(tmpdir / "plain.tar"), "-C", str(src), "."], check=True)

        def run_shard() -> None:
            out = tmpdir / "shards"
            shutil.rmtree(out, ignore_errors=True)
            assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--workers", str(args.workers),
                               "--samples-per-shard", str(args.samples_per_shard)]) == 0

        t_tar, t_shard = best_of_interleaved(args.repeats, run_tar, run_shard)
    mb = nbytes / 1e6
    print(f"corpus: {args.files} JPEGs, {mb:.0f} MB (page cache warm), best of {args.repeats}")
    print(f"tar cf:                 {t_tar:6.2f} s  {args.files / t_tar:8.0f} img/s  {mb / t_tar:7.0f} MB/s")
    print(f"data_tools.shard (w={args.workers}): {t_shard:6.2f} s  {args.files / t_shard:8.0f} img/s  {mb / t_shard:7.0f} MB/s")
    print(f"ratio shard/tar: {t_tar / t_shard:.2f}x (goal >= 0.7x)")


if __name__ == "__main__":
    main()
