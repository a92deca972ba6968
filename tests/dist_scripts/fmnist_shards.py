"""Small Fashion-MNIST shard sets for the engine tests, written by data_tools.shard (the real path).

A subset of the Debian package's IDX files becomes an ImageFolder of PNGs, which the sharder turns
into WebDataset shards exactly as a user's corpus would be.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from data_tools.shard import main as shard_main
from data_tools.sources import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _image_folder(images: Path, labels: Path, out: Path, count: int) -> Path:
    pixels, classes = read_idx(images)[:count], read_idx(labels)[:count]
    for i, (img, cls) in enumerate(zip(pixels, classes)):
        folder = out / f"class_{int(cls)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return out


def write_shards(out: Path, *, n_train: int, n_val: int, per_shard: int, src: Path = FASHION_MNIST) -> tuple[str, str]:
    """(train brace pattern, val brace pattern) of freshly written shards under ``out``."""
    patterns = []
    for split, idx, count in (("train", "train", n_train), ("val", "t10k", n_val)):
        folder = _image_folder(src / f"{idx}-images-idx3-ubyte.gz", src / f"{idx}-labels-idx1-ubyte.gz",
                               out / f"{split}_png", count)
        shard_dir = out / split
        rc = shard_main(["--src", str(folder), "--out", str(shard_dir), "--prefix", split,
                         "--samples-per-shard", str(per_shard), "--no-progress"])
        if rc:
            raise RuntimeError(f"data_tools.shard failed with exit code {rc} for {folder}")
        tars = sorted(shard_dir.glob(f"{split}-*.tar"))
        patterns.append(f"{shard_dir}/{split}-{{000000..{len(tars) - 1:06d}}}.tar")
    return patterns[0], patterns[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=64)
    args = parser.parse_args()
    print(*write_shards(args.out, n_train=args.n_train, n_val=args.n_val, per_shard=args.per_shard))
