"""Training stream images/s per worker at 224 px (crop + flip) vs the bare decode loop, one run.

Both sides run in one process on the same images: foolbox's 20 real ImageNet JPEGs (512 px and
up) sharded --copies times. The baseline only decodes (same decoder: simplejpeg when installed)
bytes already in memory; the stream also reads the tars, shuffles, crops, resizes, flips,
batches. Two stream figures, both in-process on one torch thread (as in a DataLoader worker, and
with no prefetching worker competing with the baseline's rounds):
  per worker  - `TrainLoader.worker_dataset()`: exactly what one DataLoader worker produces
                (uint8 batches); this is the figure the goal is about. Goal >= 0.8x.
Both wall-clock and process CPU time are reported: everything timed is single-threaded CPU work
in this process, so CPU time stays meaningful when other jobs share the cores.
  end to end  - the loader with num_workers=0: worker work + the main process's float
                normalisation (done once per batch in the main process whatever the worker count).

    .venv/bin/python benchmarks/bench_stream.py [--copies 20] [--batches 20] [--rounds 4]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench_shard import foolbox_jpegs
from data_tools.shard import main as shard_main
from vitscale.data import build_train_loader
from vitscale.data.decode import decode_image, simplejpeg
from vitscale.data.shards import iter_raw_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=20, help="copies of the 20 JPEGs (default 400 images)")
    p.add_argument("--batches", type=int, default=20, help="batches of 32 timed on the stream")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of decode / stream timing")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    batch = 32
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "shards"
        (src / "imagenet").mkdir(parents=True)
        for c in range(args.copies):
            for j in foolbox_jpegs():
                shutil.copyfile(j, src / "imagenet" / f"c{c:03d}_{j.name}")
        assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--samples-per-shard", "100"]) == 0
        urls = sorted(str(u) for u in out.glob("*.tar"))
        raw = [s["jpg"] for u in urls for s in iter_raw_samples(u)]

        cfg = {"train_shards": urls, "num_classes": 1, "num_workers": 0, "shuffle_buffer": 100,
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "augment": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": True}}
        train = build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=0,
                                   img_size=args.img_size, in_chans=3)
        contenders = {"decode": None, "worker": iter(train.worker_dataset()), "end to end": iter(train)}
        for it in (contenders["worker"], contenders["end to end"]):
            next(it)  # warm-up: first shard open
        for data in raw[:20]:
            decode_image(data, "jpg", 3)
        # Alternate rounds of all three so a load change on a shared machine hits them alike; best round wins.
        per_round = max(1, args.batches // args.rounds)
        n = batch * per_round
        rate = dict.fromkeys(contenders, 0.0)  # wall clock
        cpu_rate = dict.fromkeys(contenders, 0.0)  # CPU time of this process: robust when cores are shared
        for r in range(args.rounds):
            for name, it in contenders.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                if it is None:
                    for i in range(n):
                        decode_image(raw[(r * n + i) % len(raw)], "jpg", 3)
                else:
                    for _ in range(per_round):
                        next(it)
                rate[name] = max(rate[name], n / (time.perf_counter() - start))
                cpu_rate[name] = max(cpu_rate[name], n / max(time.process_time() - cpu_start, 1e-9))
    print(f"images: {len(raw)} real ImageNet JPEGs in {len(urls)} shards; decoder: "
          f"{'simplejpeg' if simplejpeg is not None else 'Pillow'}; {args.rounds} alternating rounds of {per_round} batches of {batch}, best round")
    print("                                         wall clock          CPU time of the process")
    for name, label in (("decode", "bare decode loop"), ("worker", f"stream per worker ({args.img_size}px crop+flip)"),
                        ("end to end", "stream end to end (+ normalise)")):
        print(f"{label:40s} {rate[name]:6.0f} img/s {rate[name] / rate['decode']:5.2f}x   "
              f"{cpu_rate[name]:6.0f} img/s {cpu_rate[name] / cpu_rate['decode']:5.2f}x")
    print("goal: stream per worker >= 0.8x the bare decode loop")

if __name__ == "__main__":
    main()
