"""Training stream images/s per worker at 224 px (crop + flip) vs the bare decode loop, one run.

Both sides run in one process on the same images: foolbox's 20 real ImageNet JPEGs (512 px and
up) sharded --copies times. The baseline only decodes (same decoder: simplejpeg when installed)
bytes already in memory; the stream also reads the tars, shuffles, crops, resizes, flips,
batches and normalises. One DataLoader worker (num_workers=1, one torch thread like every worker)
feeds the main process, so the stream figure is what one worker delivers. Goal >= 0.8x.

    .venv/bin/python benchmarks/bench_stream.py [--copies 20] [--batches 20]
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
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; the main process only normalises
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

        n_decode = batch * args.batches
        for data in raw[:20]:  # warm-up
            decode_image(data, "jpg", 3)
        start = time.perf_counter()
        for i in range(n_decode):
            decode_image(raw[i % len(raw)], "jpg", 3)
        decode_rate = n_decode / (time.perf_counter() - start)

        cfg = {"train_shards": urls, "num_classes": 1, "num_workers": 1, "shuffle_buffer": 100,
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "augment": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": True}}
        loader = iter(build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=0,
                                         img_size=args.img_size, in_chans=3))
        next(loader)  # warm-up: worker start, first shard open
        start = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        stream_rate = n_decode / (time.perf_counter() - start)
    print(f"images: {len(raw)} real ImageNet JPEGs in {len(urls)} shards; decoder: "
          f"{'simplejpeg' if simplejpeg is not None else 'Pillow'}; {args.batches} batches of {batch}")
    print(f"bare decode loop:              {decode_rate:7.0f} img/s")
    print(f"stream (crop+flip {args.img_size}px, 1 worker): {stream_rate:7.0f} img/s")
    print(f"ratio stream/decode: {stream_rate / decode_rate:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
