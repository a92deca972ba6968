"""Readers never use part of a shard quietly (issue 12): a damaged tar header or a sample count
that is not the manifest's is a bad shard in training and evaluation, shard lists are checked
before any worker starts, and 16-bit images reach the model scaled, not clipped.
Shards are written by data_tools.shard from real images (foolbox PNGs, Fashion-MNIST)."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools.shard import main as shard_main
from data_tools.sources import read_idx
from data_tools.verify import verify
from vitscale.data import BadShardsError, build_eval_loader, build_train_loader
from vitscale.data.checks import ShardListError, check_train_shards, check_val_shards
from vitscale.data.shards import ShardReadError, iter_raw_samples


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> Path:
    """80 real PNGs (CIFAR-10/100, MNIST, Fashion-MNIST) in 8 shards of 10, with a 0.25 val split."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("shards")
    for p in sorted(foolbox_data.glob("*.png")):
        (src / p.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copy(p, src / p.name.split("_")[0] / p.name)
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", "--samples-per-shard", "10",
                       "--val-fraction", "0.25"]) == 0
    return out


@pytest.fixture()
def copy(sharded: Path, tmp_path: Path) -> Path:
    """A private copy of the shard folder (with its manifest) for a test to damage."""
    return Path(shutil.copytree(sharded, tmp_path / "shards"))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def urls(out: Path, split: str) -> list[str]:
    return [str(out / s["name"]) for s in manifest(out)["splits"][split]["shards"]]


def damage_header(path: Path) -> None:
    """Flip bytes inside the header of the member in the middle of the tar (size unchanged):
    Python's tarfile then stops there as if at the end of the archive."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    offset = members[len(members) // 2].offset
    data = bytearray(path.read_bytes())
    data[offset + 100:offset + 110] = bytes(b ^ 0xFF for b in data[offset + 100:offset + 110])
    path.write_bytes(bytes(data))


def cfg(train: list[str], **over) -> dict:
    return {"train_shards": train, "num_classes": 4, "num_workers": 0, "shuffle_buffer": 4, "mean": [0.5],
            "std": [0.5], "augment": {"scale": [0.5, 1.0]}, "max_bad_shards": 0, **over}


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def train_loader(config: dict):
    return build_train_loader(config, batch_size=4, rank=0, world_size=1, seed=0, img_size=16, in_chans=3)


# ---------------------------------------------------------------------------------- short shards
def test_damaged_header_is_a_bad_shard_in_training(copy: Path, tmp_path: Path) -> None:
    """Before: half the shard, one 'skipping sample' warning, max_bad_shards never fired."""
    shard = Path(urls(copy, "train")[0])
    damage_header(shard)
    with pytest.raises(BadShardsError, match="damaged member header"):
        take(train_loader(cfg([str(shard)])), 50)
    loose = tmp_path / "no_manifest" / shard.name  # no manifest beside it: the tar end check alone
    loose.parent.mkdir()
    shutil.copy(shard, loose)
    with pytest.raises(ShardReadError, match="damaged member header"):
        list(iter_raw_samples(str(loose)))
    tolerant = train_loader(cfg(urls(copy, "train"), max_bad_shards=1000))
    assert len(take(tolerant, 30)) == 30 and tolerant.bad_shards > 0


def test_sample_count_must_match_the_manifest(copy: Path) -> None:
    m = manifest(copy)
    entry = m["splits"]["train"]["shards"][0]
    entry["num_samples"] += 1  # a valid tar holding one sample fewer than its manifest says
    (copy / "manifest.json").write_text(json.dumps(m))
    shard = str(copy / entry["name"])
    with pytest.raises(ShardReadError, match=f"{entry['num_samples'] - 1} samples, manifest.json says"):
        list(iter_raw_samples(shard, entry["num_samples"]))
    with pytest.raises(BadShardsError, match="manifest.json says"):
        take(train_loader(cfg([shard])), 50)


def test_eval_fails_or_says_loudly_when_its_count_is_not_the_manifests(
        copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: `eval/count 2502` for a 5000-sample shard, top-1 over half the data, exit 0."""
    kw = dict(batch_size=4, rank=0, world_size=1, img_size=16, in_chans=3, num_workers=0)
    val = urls(copy, "val")
    clean = build_eval_loader(val, **kw)
    assert sum(len(b["key"]) for b in clean) == clean.count == clean.expected == manifest(copy)["splits"]["val"][
        "num_samples"]
    damage_header(Path(val[0]))
    with pytest.raises(BadShardsError, match="damaged member header"):
        list(build_eval_loader(val, **kw))
    tolerant = build_eval_loader(val, max_bad_shards=1, **kw)
    with caplog.at_level(logging.ERROR, logger="vitscale.data.evaluation"):
        seen = sum(len(b["key"]) for b in tolerant)
    assert seen == tolerant.count < tolerant.expected and tolerant.bad_shards == [val[0]]
    assert f"evaluated {seen} samples but manifest.json lists {tolerant.expected}" in caplog.text


def test_verify_names_the_damaged_header(copy: Path) -> None:
    damage_header(Path(urls(copy, "train")[1]))
    _, problems = verify(copy)
    assert any("damaged member header" in p for p in problems), problems


# ---------------------------------------------------------------------------------- shard lists
def test_train_list_is_checked_before_any_worker_starts(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a 2-shard list with one file missing trained to the end with exit 0."""
    train = urls(copy, "train")
    missing = str(copy / "data-train-000099.tar")
    with pytest.raises(ShardListError, match=r"data.train_shards: 1 of 2 shards unusable.*000099.tar: No such file"):
        train_loader(cfg([train[0], missing]))
    with caplog.at_level(logging.ERROR):
        assert check_train_shards(cfg([train[0], missing], max_bad_shards=1)).problems  # tolerated, logged
    assert "000099.tar" in caplog.text
    Path(train[1]).write_bytes(Path(train[1]).read_bytes()[:-1024])  # truncated: size differs
    with pytest.raises(ShardListError, match="bytes, manifest.json says"):
        train_loader(cfg(train))
    stray = copy / "data-train-000042.tar"
    shutil.copy(train[0], stray)
    with pytest.raises(ShardListError, match="not listed in"):
        check_train_shards(cfg([str(stray)]))
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ShardListError, match="manifest.json: not a data_tools.shard manifest"):
        check_train_shards(cfg(train[:1]))


def test_val_list_is_checked_at_startup(copy: Path) -> None:
    val = urls(copy, "val")
    config = cfg(urls(copy, "train"), val_shards=val, num_workers=4)
    with pytest.raises(ShardListError, match=f"{len(val)} shards for 2 ranks x 4 workers = 8 readers"):
        check_val_shards(config, world_size=2)
    checked = check_val_shards(config, world_size=1, num_workers=1)
    assert checked.expected_total() == manifest(copy)["splits"]["val"]["num_samples"]
    Path(val[-1]).unlink()
    with pytest.raises(ShardListError, match="data.val_shards: 1 of"):
        check_val_shards(config, world_size=1, num_workers=1)


# ------------------------------------------------------------------------------------ 16-bit pixels
def _fmnist(fashion_mnist: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (read_idx(fashion_mnist / "t10k-images-idx3-ubyte.gz")[:n],
            read_idx(fashion_mnist / "t10k-labels-idx1-ubyte.gz")[:n])


def _png16(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16) * 257).save(buf, "PNG")  # mode I;16, full 16-bit range
    return buf.getvalue()


def _eval_pixels(shards: list[str]) -> dict[str, np.ndarray]:
    """Pixels as the model gets them (28 px, crop 1.0, mean 0, std 1), back in 0..255, by key."""
    loader = build_eval_loader(shards, batch_size=16, rank=0, world_size=1, img_size=28, in_chans=1,
                               num_workers=0, mean=(0.0,), std=(1.0,), crop_pct=1.0)
    return {k: (img[0] * 255).round().numpy() for b in loader for k, img in zip(b["key"], b["image"])}


def test_16bit_images_reach_the_model_scaled(fashion_mnist: Path, tmp_path: Path) -> None:
    """Before: clipped at 255, so 96 % of the pixels of a 16-bit corpus were white. Sharded
    (converted to 8 bits at sharding time) and written raw into a tar by another tool (scaled by
    the reader), the model sees the original 8-bit Fashion-MNIST pixels."""
    images, labels = _fmnist(fashion_mnist, 48)
    for i, (img, label) in enumerate(zip(images, labels)):
        (tmp_path / "src" / str(label)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / str(label) / f"{i:03d}.png").write_bytes(_png16(img))
    assert shard_main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress",
                       "--samples-per-shard", "16"]) == 0
    assert verify(tmp_path / "out", decode=True)[1] == []
    for key, pixels in _eval_pixels(urls(tmp_path / "out", "train")).items():
        assert np.array_equal(pixels, images[int(key.split("_")[1])]), key
    raw = tmp_path / "raw.tar"
    with wds.TarWriter(str(raw)) as tw:
        for i in range(8):
            tw.write({"__key__": f"x_{i:03d}", "png": _png16(images[i]), "cls": str(labels[i]).encode()})
    for key, pixels in _eval_pixels([str(raw)]).items():
        assert np.array_equal(pixels, images[int(key.split("_")[1])]), key
    batch = take(build_train_loader({"train_shards": str(raw), "num_classes": 10, "num_workers": 0,
                                     "mean": [0.0], "std": [1.0], "augment": {"scale": [1, 1], "ratio": [1, 1],
                                                                               "hflip": False}},
                                    batch_size=8, rank=0, world_size=1, seed=0, img_size=28, in_chans=1), 1)[0]
    for key, image in zip(batch["key"], batch["image"]):  # the full frame: crop scale 1, ratio 1, no flip
        assert torch.equal(image[0].mul(255).round(), torch.tensor(images[int(key.split("_")[1])], dtype=torch.float32))
