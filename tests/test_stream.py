"""vitscale.data over shards written by data_tools.shard from the real foolbox images."""
from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.shard import main as shard_main
from data_tools.sources import read_idx
from vitscale.data import BadShardsError, build_eval_loader, build_train_loader
from vitscale.data import decode as decode_module


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> dict:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("shards")
    for p in foolbox_data.iterdir():
        (src / p.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(p, src / p.name.split("_")[0] / p.name)
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--samples-per-shard", "7",
                       "--val-fraction", "0.3", "--seed", "3"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    return {"out": out, "manifest": m,
            "train": [str(out / s["name"]) for s in m["splits"]["train"]["shards"]],
            "val": [str(out / s["name"]) for s in m["splits"]["val"]["shards"]]}


def data_cfg(shards: dict, **over: Any) -> dict:
    cfg = {"train_shards": shards["train"], "val_shards": shards["val"], "num_classes": 5, "num_workers": 0,
           "shuffle_buffer": 4, "mean": [0.5], "std": [0.25],
           "augment": {"scale": [0.3, 1.0], "ratio": [0.75, 1.33], "hflip": True, "randaugment": "rand-m9-mstd0.5",
                       "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
           "max_bad_shards": 0}
    cfg.update(over)
    return cfg


def loader(cfg: dict, rank: int = 0, world_size: int = 1, in_chans: int = 3, batch_size: int = 4):
    return build_train_loader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=7,
                              img_size=24, in_chans=in_chans)


def take(it, n: int) -> list[dict]:
    out = []
    for batch in it:
        out.append(batch)
        if len(out) == n:
            break
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_keys_and_pixels(shards: dict, num_workers: int) -> None:
    """N batches straight == K batches, state_dict, fresh loader, load_state_dict, N-K batches."""
    cfg = data_cfg(shards, num_workers=num_workers)
    straight = take(loader(cfg), 9)
    first = loader(cfg)
    head = take(first, 5)  # odd: with 2 workers the resumed round-robin must start at worker 1
    state = first.state_dict()
    resumed = loader(cfg)
    resumed.load_state_dict(state)
    assert_same(straight, head + take(resumed, 4))
    assert straight[0]["image"].shape == (4, 3, 24, 24) and straight[0]["label"].shape == (4, 5)
    assert len({k for b in straight for k in b["key"]}) > 12  # samples really come from several shards


def test_exact_resume_two_ranks(shards: dict) -> None:
    """Ranks draw different streams; each rank's position travels in one merged state (what
    state_dict() gathers under torch.distributed) and each resumed rank continues exactly."""
    cfg = data_cfg(shards, num_workers=2)
    straight = [take(loader(cfg, rank=r, world_size=2), 6) for r in range(2)]
    assert [b["key"] for b in straight[0]] != [b["key"] for b in straight[1]]
    firsts = [loader(cfg, rank=r, world_size=2) for r in range(2)]
    heads = [take(f, 3) for f in firsts]
    states = [f.state_dict() for f in firsts]
    merged = {**states[0], "ranks": {**states[0]["ranks"], **states[1]["ranks"]}}
    for r in range(2):
        resumed = loader(cfg, rank=r, world_size=2)
        resumed.load_state_dict(merged)
        assert_same(straight[r], heads[r] + take(resumed, 3))


def test_resume_skips_without_decoding(shards: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resumed loader decodes only what it yields: skipped samples stay raw bytes."""
    cfg = data_cfg(shards, shuffle_buffer=3)
    first = loader(cfg)
    take(first, 5)
    calls = []
    real = decode_module.EncodedImage.decode
    monkeypatch.setattr(decode_module.EncodedImage, "decode", lambda *a: calls.append(1) or real(*a))
    resumed = loader(cfg)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 2)
    assert len(calls) == 2 * 4


def test_state_mismatch_is_a_clear_error(shards: dict) -> None:
    state = loader(data_cfg(shards, num_workers=0)).state_dict()
    with pytest.raises(ValueError, match="num_workers=0 in the checkpoint but 2 now"):
        loader(data_cfg(shards, num_workers=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="holds ranks \\['0'\\] but this is rank 1"):
        loader(data_cfg(shards), rank=1, world_size=2).load_state_dict({**state, "world_size": 2})


@pytest.mark.parametrize("in_chans", [1, 3])
def test_channels_and_plain_labels(shards: dict, in_chans: int) -> None:
    cfg = data_cfg(shards, augment={"scale": [0.5, 1.0], "hflip": False}, mean=[0.5], std=[0.5])
    batch = take(loader(cfg, in_chans=in_chans), 1)[0]
    assert batch["image"].shape == (4, in_chans, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["image"].is_contiguous()  # workers stack channels-last; the float conversion restores this
    assert batch["label"].dtype == torch.long and -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_grayscale_sources_replicate_to_three_channels(tmp_path: Path, foolbox_data: Path) -> None:
    (tmp_path / "src" / "mnist").mkdir(parents=True)
    for p in foolbox_data.glob("mnist_*.png"):
        shutil.copy(p, tmp_path / "src" / "mnist" / p.name)
    assert shard_main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    cfg = {"train_shards": str(tmp_path / "o" / "data-000000.tar"), "num_classes": 1, "num_workers": 0}
    image = take(loader(cfg, in_chans=3), 1)[0]["image"]
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_eval_sees_every_sample_once(shards: dict, world_size: int, num_workers: int) -> None:
    keys: list[str] = []
    for rank in range(world_size):
        ev = build_eval_loader(shards["val"], batch_size=3, rank=rank, world_size=world_size, img_size=20,
                               in_chans=1, num_workers=num_workers, cfg_data=data_cfg(shards))
        for batch in ev:
            assert batch["image"].shape[1:] == (1, 20, 20) and batch["label"].dtype == torch.long
            keys += batch["key"]
    assert len(keys) == len(set(keys)) == shards["manifest"]["splits"]["val"]["num_samples"]


def test_eval_guards(shards: dict) -> None:
    kw = dict(batch_size=2, rank=0, img_size=16, in_chans=3)
    n = len(shards["val"])
    with pytest.raises(ValueError, match=f"{n} shards for 2 ranks x {n} workers = {2 * n} readers"):
        build_eval_loader(shards["val"], world_size=2, num_workers=n, **kw)
    with pytest.raises(ValueError, match="no shards given"):
        build_eval_loader([], world_size=1, num_workers=0, **kw)
    with pytest.raises(ValueError, match="no shards given"):
        loader({"train_shards": None, "num_classes": 3})


def test_bad_shards_are_counted_then_fatal(shards: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(shards["train"][0]).read_bytes()[:5000])
    urls = [str(broken), str(tmp_path / "missing.tar")]
    with pytest.raises(ValueError, match="missing.tar: No such file"):  # checked before any worker starts
        loader(data_cfg(shards, train_shards=urls))
    with pytest.raises(BadShardsError, match="more than data.max_bad_shards=0"):
        take(loader(data_cfg(shards, train_shards=urls[:1])), 1)
    tolerant = loader(data_cfg(shards, train_shards=shards["train"][:2] + urls, max_bad_shards=1000))
    assert len(take(tolerant, 8)) == 8 and tolerant.bad_shards > 0  # half the draws hit a bad shard
    ev = build_eval_loader(shards["val"] + urls, batch_size=4, rank=0, world_size=1, img_size=16, in_chans=3,
                           num_workers=0, max_bad_shards=2)
    seen = sum(len(b["key"]) for b in ev)
    assert seen == shards["manifest"]["splits"]["val"]["num_samples"] and len(ev.bad_shards) == 2
    with pytest.raises(BadShardsError, match="2 eval shards failed"):
        list(build_eval_loader(urls, batch_size=4, rank=0, world_size=1, img_size=16, in_chans=3,
                               num_workers=0, max_bad_shards=1))


def test_fashion_mnist_one_channel(fashion_mnist: Path, tmp_path: Path) -> None:
    """The real t10k images (first 1000, written back as IDX) feed a 1-channel stem at 28 px."""
    for kind, n in (("images-idx3", 1000), ("labels-idx1", 1000)):
        array = read_idx(fashion_mnist / f"t10k-{kind}-ubyte.gz")[:n]
        header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (tmp_path / f"t10k-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    assert shard_main(["--src", str(tmp_path / "t10k-images-idx3-ubyte.gz"), "--out", str(tmp_path / "o"),
                       "--no-progress", "--samples-per-shard", "250", "--workers", "2"]) == 0
    cfg = {"train_shards": str(tmp_path / "o" / "data-{000000..000003}.tar"), "num_classes": 10, "num_workers": 0,
           "mean": [0.286], "std": [0.353], "augment": {"scale": [0.8, 1.0], "hflip": True}}
    batch = take(build_train_loader(cfg, batch_size=16, rank=0, world_size=1, seed=0, img_size=28, in_chans=1), 1)[0]
    assert batch["image"].shape == (16, 1, 28, 28) and batch["label"].max() < 10


def test_shards_without_samples_fail_instead_of_hanging(tmp_path: Path, shards: dict) -> None:
    with wds.TarWriter(str(tmp_path / "empty.tar")):
        pass
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        take(loader(data_cfg(shards, train_shards=[str(tmp_path / "empty.tar")])), 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(shards: dict, num_workers: int) -> None:
    """A resumed run must keep the training process's RNG stream (dropout) where it was."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(loader(data_cfg(shards, num_workers=num_workers)), 2)
    assert torch.equal(torch.rand(3), expected)


def test_scaled_jpeg_decode_uses_only_power_of_two_scales(foolbox_data: Path) -> None:
    """libjpeg-turbo's 5/8..7/8 scales cost more than a full decode: only 1, 1/2, 1/4, 1/8 are
    used, the smallest one that still covers the requested size."""
    if decode_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed: JPEGs are decoded by Pillow at full size")
    for path in sorted(foolbox_data.glob("imagenet_*.jpg"))[:12]:
        data = path.read_bytes()
        w, h = decode_module.image_size(data, "jpg")
        for need in [(1, 1), (w // 8, h // 8), (w // 3, h // 5), (w // 2 + 1, 10), (w * 5 // 8, h * 5 // 8), (w, h)]:
            got_h, got_w = decode_module.decode_image(data, "jpg", 3, need).shape[:2]
            scales = [d for d in (8, 4, 2, 1) if -(-w // d) >= need[0] and -(-h // d) >= need[1]]
            assert (got_w, got_h) == (-(-w // scales[0]), -(-h // scales[0])), (path.name, need)


def test_train_crop_is_torchvision_resized_crop(foolbox_data: Path) -> None:
    """Large images take torch's per-image kernel: torchvision's resized_crop pixels, bit for bit,
    on the box and flip the transform's own sampler drew."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from vitscale.data.config import parse_data_config
    from vitscale.data.transforms import TrainTransform

    cfg = parse_data_config({"train_shards": ["unused.tar"], "num_classes": 1,
                             "augment": {"scale": [0.08, 1.0], "hflip": 0.5}})
    transform = TrainTransform(64, cfg.augment, cfg.mean, 3)
    transform.dct_scaling = False
    flips = []
    for seed, path in enumerate(sorted(foolbox_data.glob("imagenet_*.jpg"))[:6]):
        data = path.read_bytes()
        full = decode_module.decode_image(data, "jpg", 3)
        [(top, left, h, w)], [flip] = transform.plan([(full.shape[1], full.shape[0])], [seed])
        expected = F.resized_crop(torch.from_numpy(full).permute(2, 0, 1), int(top), int(left), int(h), int(w),
                                  [64, 64], InterpolationMode.BILINEAR, antialias=True)
        expected = F.horizontal_flip(expected) if flip else expected
        assert torch.equal(transform(data, "jpg", seed), expected), path.name
        flips.append(bool(flip))
    assert 0 < sum(flips) < len(flips)


def test_small_batches_travel_pickled_large_ones_in_shared_memory(shards: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Below PICKLE_BELOW a worker's batch goes through its pipe as a numpy array (no per-storage
    fd handshake), above it as a shared-memory tensor; the batches training sees are the same."""
    from vitscale.data import handoff

    cfg = data_cfg(shards, num_workers=2)
    small = next(iter(loader(cfg).worker_dataset()))
    assert isinstance(small["image"], np.ndarray) and small["image"].dtype == np.uint8
    piped = take(loader(cfg), 4)
    monkeypatch.setattr(handoff, "PICKLE_BELOW", 0)
    assert isinstance(next(iter(loader(cfg).worker_dataset()))["image"], torch.Tensor)
    shared = take(loader(cfg), 4)
    for a, b in zip(piped, shared):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["key"] == b["key"]
