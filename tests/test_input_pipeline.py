"""The training input pipeline's cost properties (issue 17): one decode per sample, batch-level
crop / resize / flip with RandomResizedCrop's semantics, the fast tar reader agreeing with tarfile,
and no read stall at shard changes, while resume stays exact. Real images: foolbox JPEGs / PNGs
and Fashion-MNIST."""
from __future__ import annotations

import gzip
import io
import random
import shutil
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.shard import main as shard_main
from data_tools.shard_format import iter_tar_files
from data_tools.sources import read_idx
from test_stream import take  # tests/ is on sys.path
from vitscale.data import build_train_loader
from vitscale.data import decode as decode_module
from vitscale.data import stream as stream_module
from vitscale.data.config import AugmentConfig
from vitscale.data.shards import ShardReadError, _local_tar_members, iter_raw_samples
from vitscale.data.transforms import TrainTransform, counter_uniforms, random_resized_crops

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def foolbox_shards(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> list[str]:
    """40 real images (JPEG photos and CIFAR / MNIST PNGs), 5 classes, shards of 7."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("shards")
    for p in foolbox_data.iterdir():
        (src / p.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(p, src / p.name.split("_")[0] / p.name)
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--samples-per-shard", "7"]) == 0
    return sorted(str(p) for p in out.glob("*.tar"))


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> str:
    """The first 1000 real t10k images in 4 shards of 250 (the demo's layout, scaled down)."""
    tmp = tmp_path_factory.mktemp("fmnist")
    for kind in ("images-idx3", "labels-idx1"):
        array = read_idx(fashion_mnist / f"t10k-{kind}-ubyte.gz")[:1000]
        header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (tmp / f"t10k-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    assert shard_main(["--src", str(tmp / "t10k-images-idx3-ubyte.gz"), "--out", str(tmp / "o"), "--no-progress",
                       "--samples-per-shard", "250", "--workers", "1"]) == 0
    return str(tmp / "o" / "data-{000000..000003}.tar")


def fmnist_cfg(pattern: str, **over) -> dict:
    return {"train_shards": pattern, "num_classes": 10, "num_workers": 0, "shuffle_buffer": 250,
            "mean": [0.286], "std": [0.353], "augment": {"scale": [0.8, 1.0], "ratio": [0.9, 1.1111111]}, **over}


# ------------------------------------------------------------------------------------ decode once
def test_each_sample_is_opened_and_decoded_once(foolbox_shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One header read and one decoder call per sample yielded (JPEG: simplejpeg, PNG: libpng),
    and no Pillow open at all for these formats (before: Pillow opened every PNG twice)."""
    opened, decoded, decoders = Counter(), Counter(), Counter()
    real_init, real_decode = decode_module.EncodedImage.__init__, decode_module.EncodedImage.decode

    def counting_init(self, data, ext):
        opened[data] += 1
        real_init(self, data, ext)

    def counting_decode(self, *a, **k):
        decoded[self.data] += 1
        return real_decode(self, *a, **k)

    def count(name, fn):
        return lambda *a, **k: decoders.update([name]) or fn(*a, **k)

    monkeypatch.setattr(decode_module.EncodedImage, "__init__", counting_init)
    monkeypatch.setattr(decode_module.EncodedImage, "decode", counting_decode)
    monkeypatch.setattr(decode_module, "_decode_png_op", count("png", decode_module._decode_png_op))
    monkeypatch.setattr(decode_module.Image, "open", count("pil", decode_module.Image.open))
    if decode_module.simplejpeg is not None:
        real_jpeg = decode_module.simplejpeg
        fake = type("simplejpeg", (), {"decode_jpeg_header": staticmethod(real_jpeg.decode_jpeg_header),
                                       "decode_jpeg": staticmethod(count("jpeg", real_jpeg.decode_jpeg))})
        monkeypatch.setattr(decode_module, "simplejpeg", fake)
    cfg = {"train_shards": foolbox_shards, "num_classes": 5, "num_workers": 0, "shuffle_buffer": 4,
           "augment": {"scale": [0.3, 1.0], "hflip": True}}
    batches = take(build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=1, img_size=24, in_chans=3), 12)
    yielded = sum(len(b["key"]) for b in batches)
    assert sum(opened.values()) == sum(decoded.values()) == sum(decoders.values()) == yielded == 48
    assert decoders["png"] > 0 and (decoders["jpeg"] > 0 or decode_module.simplejpeg is None)
    if decode_module.simplejpeg is not None:
        assert decoders["pil"] == 0


def test_png_fast_path_gives_pillows_pixels(foolbox_data: Path) -> None:
    from PIL import Image

    for path in sorted(foolbox_data.glob("*.png")):
        data = path.read_bytes()
        for chans, mode in ((1, "L"), (3, "RGB")):
            ref = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
            ref = ref[..., None] if ref.ndim == 2 else ref
            assert np.array_equal(decode_module.decode_image(data, "png", chans), ref), (path.name, chans)


# ---------------------------------------------------------------------------- batch augmentation
def test_crop_sampler_has_timms_distribution() -> None:
    """The vectorised sampler vs timm's RandomResizedCropAndInterpolation.get_params (Python's
    `random`), 20k draws each: same means and spreads of (top, left, h, w), for a square 28-px image
    with mild crops, a 500x375 photo with ImageNet's defaults, and a 3x1 image (fallback crops)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    n = 20000
    for (w, h), scale, ratio in (((28, 28), (0.8, 1.0), (0.9, 1 / 0.9)), ((500, 375), (0.08, 1.0), (0.75, 4 / 3)),
                                 ((3, 1), (0.08, 1.0), (0.75, 4 / 3))):
        ours = random_resized_crops(np.array([(w, h)] * n), counter_uniforms(np.arange(n), 23), scale, ratio)
        random.seed(0)
        img = torch.empty(1, 1, 1).expand(1, h, w)
        ref = np.array([RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)])
        ref[:, 2:] = np.maximum(ref[:, 2:], 1)  # vitscale clamps timm's 0-pixel boxes of tiny images ...
        ref[:, :2] = np.minimum(ref[:, :2], np.array([h, w]) - ref[:, 2:])  # ... inside the image
        side = np.array([h, w, h, w])
        assert np.all(np.abs(ours.mean(0) - ref.mean(0)) / side < 0.01), (w, h, ours.mean(0), ref.mean(0))
        assert np.all(np.abs(ours.std(0) - ref.std(0)) / side < 0.01), (w, h, ours.std(0), ref.std(0))
        assert np.all(ours[:, 2:] >= 1)
        assert np.all(ours[:, 0] + ours[:, 2] <= h) and np.all(ours[:, 1] + ours[:, 3] <= w)


def test_crops_are_a_function_of_each_samples_seed() -> None:
    t = TrainTransform(28, AugmentConfig(scale=(0.08, 1.0), hflip=0.5), (0.5,), 1)
    sizes, seeds = [(28, 28), (500, 375), (32, 30)] * 50, list(range(1000, 1150))
    boxes, flips = t.plan(sizes, seeds)
    for i in (0, 1, 77, 149):
        one_box, one_flip = t.plan([sizes[i]], [seeds[i]])
        assert np.array_equal(one_box[0], boxes[i]) and one_flip[0] == flips[i]
    again = t.plan(sizes, seeds)
    assert np.array_equal(again[0], boxes) and np.array_equal(again[1], flips)
    other = t.plan(sizes, [s + 10_000 for s in seeds])
    assert not np.array_equal(other[0], boxes)
    assert 0.4 < flips.mean() < 0.6


@pytest.mark.parametrize("hwc,size", [((28, 28, 1), 28), ((32, 32, 3), 32), ((28, 28, 1), 16), ((30, 40, 3), 24)])
def test_batched_resize_matches_the_per_image_kernel(hwc: tuple[int, int, int], size: int) -> None:
    """Same-size small images: one pair of matmuls for the batch gives torch's antialiased bilinear
    resized crop (and flip) of each image up to rounding: +-1 level."""
    rng = np.random.default_rng(0)
    t = TrainTransform(size, AugmentConfig(scale=(0.08, 1.0), hflip=0.5), (0.5,), hwc[2])
    decoded = [rng.integers(0, 256, hwc, dtype=np.uint8) for _ in range(64)]
    boxes, flips = t.plan([(hwc[1], hwc[0])] * 64, list(range(64)))
    crops = [tuple(int(v) for v in b) for b in boxes]
    batched = t._resize_batched(decoded, crops, flips)
    single = torch.stack([t._resize_one(d, c, bool(f)) for d, c, f in zip(decoded, crops, flips)])
    assert batched.shape == single.shape == (64, hwc[2], size, size) and batched.dtype == torch.uint8
    assert (batched.int() - single.int()).abs().max() <= 1
    assert torch.equal(t._resize_batched(decoded[:1], crops[:1], flips[:1])[0], batched[0])  # batch-independent


def test_finish_picks_batched_or_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    t = TrainTransform(28, AugmentConfig(), (0.5,), 1)
    used = []
    fake = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    monkeypatch.setattr(t, "_resize_batched", lambda *a: used.append("batched") or fake)
    real_one = t._resize_one
    monkeypatch.setattr(t, "_resize_one", lambda *a: used.append("one") or real_one(*a))
    boxes, flips = t.plan([(28, 28)] * 2, [1, 2])
    t.finish([np.zeros((28, 28, 1), np.uint8)] * 2, [(28, 28)] * 2, boxes, flips, [1, 2])
    assert used == ["batched"]
    used.clear()  # mixed sizes, or large images: torch's per-image kernel
    boxes, flips = t.plan([(28, 28), (30, 28)], [1, 2])
    images = [np.zeros((28, 28, 1), np.uint8), np.zeros((28, 30, 1), np.uint8)]
    t.finish(images, [(28, 28), (30, 28)], boxes, flips, [1, 2])
    assert used == ["one", "one"]


# --------------------------------------------------------------------------------------- tar reader
def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _both(path: Path) -> tuple[tuple[list, str | None], tuple[list, str | None]]:
    def run(reader):
        got = []
        try:
            with path.open("rb") as f:
                for member in reader(f):
                    got.append(member)
        except Exception as e:
            return got, f"{type(e).__name__}: {e}"
        return got, None
    return run(_local_tar_members), run(iter_tar_files)


def test_fast_tar_reader_agrees_with_tarfile(foolbox_shards: list[str], tmp_path: Path) -> None:
    """Same members and same errors as data_tools' tarfile-based reader, on real shards and on
    what the fast path leaves to tarfile (PAX long names, GNU format, links, damage, truncation)."""
    cases = {f"shard{i}": Path(u).read_bytes() for i, u in enumerate(foolbox_shards[:2])}
    long_name = "d/" + "x" * 150 + ".png"
    cases["pax_long_name"] = _tar([("a.cls", b"1"), (long_name, b"\x89PNG"), ("b.cls", b"2")], tarfile.PAX_FORMAT)
    cases["gnu"] = _tar([("a.cls", b"1"), (long_name, b"zz")], tarfile.GNU_FORMAT)
    cases["dirs_and_meta"] = _tar([("d", None), ("d/a.cls", b"1"), ("__meta__.json", b"{}"), ("d/a.txt", b"x" * 700)])
    good = cases["shard0"]
    cases["truncated"] = good[:len(good) // 2 + 100]
    damaged = bytearray(good)
    damaged[1024 * 6 + 100:1024 * 6 + 110] = bytes(b ^ 0xFF for b in damaged[1024 * 6 + 100:1024 * 6 + 110])
    cases["damaged_header"] = bytes(damaged)
    cases["garbage_after_end"] = good + b"\x01" * 10
    cases["empty"] = _tar([])
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        fast, reference = _both(path)
        assert fast == reference, name
        valid = ("shard0", "shard1", "pax_long_name", "gnu", "dirs_and_meta", "empty")
        assert (reference[1] is None) == (name in valid), name
    with pytest.raises(ShardReadError, match="damaged member header"):
        list(iter_raw_samples(str(tmp_path / "damaged_header.tar")))


# ------------------------------------------------------------------------------------- no stall
def test_shard_changes_do_not_stall_the_worker(fmnist_shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shuffle window = shard size (the demo's setting), the old reader read a whole shard
    (here 250 samples, 5000 in the demo) before the first batch of each draw: a stall longer than the
    worker's queue. Now each batch reads at most ~2 batches' worth of raw samples ahead."""
    reads: list[int] = [0]
    real = stream_module.iter_raw_samples

    def counting(url, expected=None):
        for sample in real(url, expected):
            reads[0] += 1
            yield sample

    monkeypatch.setattr(stream_module, "iter_raw_samples", counting)
    loader = build_train_loader(fmnist_cfg(fmnist_shards), batch_size=16, rank=0, world_size=1, seed=0, img_size=28,
                                in_chans=1)
    per_batch, before, stream = [], 0, iter(loader.worker_dataset())
    for _ in range(60):  # 960 samples: about 4 shard changes
        assert "_bad_shard" not in next(stream)
        per_batch.append(reads[0] - before)
        before = reads[0]
    assert per_batch[0] <= 250 + 2 * 16  # start-up: the first window, and reading ahead begins
    assert max(per_batch[1:]) <= 2 * 16, per_batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_across_shard_changes(fmnist_shards: str, num_workers: int) -> None:
    """Resuming while the reader is ahead in the next shard: the same batches, pixel for pixel."""
    cfg = fmnist_cfg(fmnist_shards, num_workers=num_workers, augment={"scale": [0.5, 1.0], "hflip": True,
                                                                       "label_smoothing": 0.1})

    def make():
        return build_train_loader(cfg, batch_size=32, rank=0, world_size=1, seed=3, img_size=28, in_chans=1)

    straight = take(make(), 26)
    first = make()
    head = take(first, 15)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = take(resumed, 11)
    assert [b["key"] for b in straight] == [b["key"] for b in head + tail]
    for a, b in zip(straight, head + tail):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert straight[0]["image"].shape == (32, 1, 28, 28)
