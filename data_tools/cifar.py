"""`python -m data_tools.cifar --src cifar-10-batches-py --out OUT`: shard and verify both CIFAR splits.

The source itself (reading the pickles) is data_tools.cifar_source; data_tools.shard uses it for
`--src` pointing at a CIFAR folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.cifar_source import CifarSource, is_cifar
from data_tools.shard import main as shard_main
from data_tools.verify import main as verify_main

__all__ = ["CifarSource", "is_cifar", "main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.cifar",
                                description="Shard and verify both splits of a CIFAR-10/100 python folder.")
    p.add_argument("--src", type=Path, required=True, help="cifar-10-batches-py/ or cifar-100-python/")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/<kind>-train and OUT/<kind>-test")
    p.add_argument("--train-per-shard", type=int, default=1000)
    p.add_argument("--test-per-shard", type=int, default=250)
    p.add_argument("--workers", type=int, default=1, help="writer processes (output does not depend on it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not (args.src.is_dir() and is_cifar(args.src)):
        print(f"error: {args.src}: expected cifar-10-batches-py/ (batches.meta) or cifar-100-python/ (meta)",
              file=sys.stderr)
        return 2
    kind = "cifar10" if (args.src / "batches.meta").is_file() else "cifar100"
    patterns = {}
    for split, per_shard, order in (("train", args.train_per_shard, []), ("test", args.test_per_shard, ["--no-shuffle"])):
        out = args.out / f"{kind}-{split}"
        rc = shard_main(["--src", str(args.src), "--split", split, "--out", str(out), "--prefix", f"{kind}-{split}",
                         "--samples-per-shard", str(per_shard), "--workers", str(args.workers), *order,
                         *(["--no-progress"] if args.no_progress else [])])
        if rc:
            return rc
        if verify_main([str(out)]):
            return 1
        manifest = json.loads((out / "manifest.json").read_text())
        patterns[split] = str(out / manifest["splits"]["train"]["pattern"])
    print(f"train: {patterns['train']}\ntest: {patterns['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
