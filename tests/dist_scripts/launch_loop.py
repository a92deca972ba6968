"""Launch a short 2-rank ZeRO run N times and count unclean exits (the teardown-flake check).

Not a unit test (minutes of CPU): run by hand, e.g.
    python tests/dist_scripts/launch_loop.py --runs 15 --shards /tmp/shards/train/train-{000000..000007}.tar
It counts non-zero exit codes and the C++ abort message `terminate called without an active
exception` that a rank printed at shutdown before the teardown in vitscale.engine.distributed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--shards", required=True, help="train shard brace pattern")
    parser.add_argument("--stage", type=int, default=3)
    args = parser.parse_args()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    bad = aborts = 0
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(29600 + i), str(REPO / "vitscale/train.py"),
                   "+experiment=demo_pretrain", "model=vit_demo", "model.img_size=14", f"deepspeed=zero{args.stage}", f"output_dir={out}",
                   f"data.train_shards='{args.shards}'", "data.val_shards=null", "data.num_workers=1",
                   "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "trainer.global_batch_size=32",
                   "trainer.micro_batch_size=16", "trainer.max_steps=3", "trainer.checkpoint_every=3",
                   "trainer.export_at_end=false", "tracking.enabled=false"]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            text = proc.stdout + proc.stderr
            abort = "terminate called" in text
            bad += proc.returncode != 0
            aborts += abort
            print(f"launch {i + 1:2d}/{args.runs}: exit {proc.returncode}, abort message: {abort}, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                print(text[-3000:], flush=True)
    print(f"{args.runs} launches: {bad} non-zero exits, {aborts} with 'terminate called'")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
