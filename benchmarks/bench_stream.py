"""Training stream images/s per worker at 224 px (crop + flip) vs the bare decode loop, one run.

Like with like: foolbox's 20 real ImageNet JPEGs (512 px and one 1024x683) sharded --copies
times; each timed stream round is paired with a bare decode loop over exactly the images that
round yielded (same keys, same bytes already in memory, same decoder: simplejpeg when installed,
at full size, RGB). The stream also reads the tars, shuffles, draws the crop, decodes (at a
reduced DCT scale when the crop allows, see docs/data.md), crops, resizes (bilinear,
antialiased), flips and batches. Everything runs in this process on one torch thread, as in a
DataLoader worker. Two stream figures:
  per worker  - `TrainLoader.worker_dataset()`: exactly what one DataLoader worker produces
                (uint8 batches); this is the figure the goal is about. Goal >= 0.8x.
  end to end  - the loader with num_workers=0: worker work + the main process's float
                normalisation (done once per batch in the main process whatever the worker count).
Rounds alternate the two streams; per round the ratio is stream rate / decode rate on the same
images. Printed: best and median over rounds, for wall clock and for the process's CPU time
(the timed work is single-threaded, so CPU time is the robust figure when other jobs share the cores).

    .venv/bin/python benchmarks/bench_stream.py [--copies 20] [--batches 20] [--rounds 4]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
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
        raw = {s["__key__"]: s["jpg"] for u in urls for s in iter_raw_samples(u)}

        cfg = {"train_shards": urls, "num_classes": 1, "num_workers": 0, "shuffle_buffer": 100,
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "augment": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": True}}
        train = build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=0,
                                   img_size=args.img_size, in_chans=3)
        streams = {"worker": iter(train.worker_dataset()), "end to end": iter(train)}
        for it in streams.values():
            next(it)  # warm-up: first shard open
        for data in list(raw.values())[:20]:
            decode_image(data, "jpg", 3)
        per_round = max(1, args.batches // args.rounds)
        n = batch * per_round
        # name -> list of (stream wall, stream cpu, decode wall, decode cpu) seconds, one per round
        rounds: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in streams}
        for r in range(args.rounds):
            for name in (list(streams) if r % 2 == 0 else list(reversed(streams))):
                keys: list[str] = []
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(per_round):
                    keys += next(streams[name])["key"]
                stream_wall, stream_cpu = time.perf_counter() - start, time.process_time() - cpu_start
                start, cpu_start = time.perf_counter(), time.process_time()
                for key in keys:
                    decode_image(raw[key], "jpg", 3)
                rounds[name].append((stream_wall, stream_cpu, time.perf_counter() - start, time.process_time() - cpu_start))
    print(f"images: {len(raw)} real ImageNet JPEGs in {len(urls)} shards; decoder: "
          f"{'simplejpeg' if simplejpeg is not None else 'Pillow'}; {args.rounds} alternating rounds of {per_round} "
          f"batches of {batch}; each stream round vs a decode loop over the same {n} images")
    print(f"{'':40s} {'img/s best':>10s} {'median':>7s} | {'ratio best':>10s} {'median':>7s}")
    for name, label in (("worker", f"stream per worker ({args.img_size}px crop+flip)"),
                        ("end to end", "stream end to end (+ normalise)")):
        for clock, (si, di) in (("wall", (0, 2)), ("CPU", (1, 3))):
            rates = [n / max(x[si], 1e-9) for x in rounds[name]]
            base = [n / max(x[di], 1e-9) for x in rounds[name]]
            ratios = [a / b for a, b in zip(rates, base)]
            print(f"{label + ', ' + clock:40s} {max(rates):10.0f} {statistics.median(rates):7.0f} | "
                  f"{max(ratios):9.2f}x {statistics.median(ratios):6.2f}x   (decode loop: best {max(base):.0f}, "
                  f"median {statistics.median(base):.0f} img/s)")
    print("goal: stream per worker >= 0.8x the bare decode loop")


if __name__ == "__main__":
    main()
