"""`python -m data_tools.verify OUT [--decode]`: re-read every shard and compare with manifest.json.

Checks per shard: present, byte size, sha256, readable as a tar to its end-of-archive marker
(the readers' own tar iteration, `shard_format.iter_tar_files`), sample count, and that every
sample has an image, a `cls` within range and a `json`. With --decode every image is also fully
decoded under the readers' rules (pixel mode and pixel count, see `shard_format`). Exits 1
listing every problem (one line each).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

from PIL import Image
from webdataset.tariterators import group_by_keys

from data_tools.shard_format import UnsupportedPixels, check_pixel_count, eight_bit, iter_tar_files

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode_problem(data: bytes) -> str | None:
    """Why a reader would not get this image's pixels right, or None."""
    try:
        img = Image.open(io.BytesIO(data))
        check_pixel_count(*img.size)
        img.load()
        eight_bit(img)
    except UnsupportedPixels as e:
        return str(e)
    except Exception as e:
        return f"does not decode ({e})"
    return None


def check_shard(path: Path, entry: dict, num_classes: int, decode: bool) -> list[str]:
    """Every problem found in one shard, as one-line messages naming the shard (and key)."""
    name = entry["name"]
    if not path.exists():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}…, manifest says {entry['sha256'][:16]}…")
    count = 0
    try:
        with open(path, "rb") as f:
            files = ({**m, "__url__": name} for m in iter_tar_files(f))
            for sample in group_by_keys(files):
                count += 1
                key = sample["__key__"]
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    problems.append(f"{name}: {key}: no image member (expected one of {IMAGE_EXTS})")
                cls = sample.get("cls", b"").decode(errors="replace")
                if not cls.isdigit() or int(cls) >= num_classes:
                    problems.append(f"{name}: {key}: cls {cls!r} is not a class index < {num_classes}")
                if "json" not in sample:
                    problems.append(f"{name}: {key}: no json member")
                if decode and ext is not None:
                    problem = _decode_problem(sample[ext])
                    if problem:
                        problems.append(f"{name}: {key}.{ext}: {problem}")
    except Exception as e:
        problems.append(f"{name}: unreadable tar after {count} samples ({e})")
    if count != entry["num_samples"]:
        problems.append(f"{name}: {count} samples, manifest says {entry['num_samples']}")
    return problems


def verify(out: Path, decode: bool = False) -> tuple[int, list[str]]:
    """(shards checked, problems)."""
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        splits = manifest["splits"]
        num_classes = int(manifest["num_classes"])
    except (OSError, ValueError, KeyError) as e:
        return 0, [f"{manifest_path}: not a data_tools.shard manifest ({e})"]
    problems: list[str] = []
    listed = set()
    checked = 0
    for split in splits.values():
        for entry in split["shards"]:
            listed.add(entry["name"])
            problems += check_shard(out / entry["name"], entry, num_classes, decode)
            checked += 1
    strays = sorted(p.name for p in out.glob("*.tar") if p.name not in listed)
    problems += [f"{name}: tar file not listed in manifest.json" for name in strays]
    return checked, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder written by data_tools.shard")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    args = p.parse_args(argv)
    checked, problems = verify(args.out, args.decode)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.out} ({checked} shards checked)", file=sys.stderr)
        return 1
    print(f"verify: OK, {checked} shards in {args.out} match manifest.json" + (" (all images decoded)" if args.decode else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
