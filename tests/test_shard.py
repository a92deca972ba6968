"""data_tools.shard on real images (foolbox's ImageNet JPEGs and CIFAR/MNIST PNGs), bad inputs
made here, and real Fashion-MNIST IDX data when installed."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.shard import main as shard_main
from data_tools.sources import read_idx
from data_tools.hashed_file import HashedFile
from data_tools.writer import TAR_OWNER, ShardTarWriter

BAD_INPUTS = {
    "notes.txt": "not an image",
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated JPEG",
    "truncated.png": "corrupt or truncated PNG",
    "badcrc.png": "corrupt or truncated PNG",
}


def build_corpus(root: Path, foolbox_data: Path, *, copies: int = 1, bad: bool = True) -> Path:
    """ImageFolder tree: one class per foolbox family (imagenet, cifar10, ...), plus bad files."""
    for src in sorted(foolbox_data.iterdir()):
        family = src.name.split("_")[0]
        (root / family).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            shutil.copy(src, root / family / (src.name if c == 0 else f"c{c}_{src.name}"))
    if bad:
        jpg = next(foolbox_data.glob("imagenet_*.jpg")).read_bytes()
        png = bytearray(next(foolbox_data.glob("cifar10_*.png")).read_bytes())
        bad_dir = root / "imagenet"
        (bad_dir / "notes.txt").write_text("not pixels\n")
        (bad_dir / "empty.jpg").write_bytes(b"")
        (bad_dir / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
        (bad_dir / "trailer.jpg").write_bytes(jpg + b"camera trailer after EOI" * 40)  # valid: must pass
        (bad_dir / "truncated.png").write_bytes(bytes(png[: len(png) // 2]))
        png[-20] ^= 0xFF  # inside the last IDAT's data: its CRC no longer matches
        (bad_dir / "badcrc.png").write_bytes(bytes(png))
    return root


def shard(src: Path, out: Path, *extra: str) -> dict:
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"), foolbox_data)


@pytest.fixture(scope="module")
def sharded(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out")
    return out, shard(corpus, out, "--samples-per-shard", "16", "--workers", "1", "--val-fraction", "0.2")


def test_byte_identical_for_any_worker_count(corpus: Path, sharded: tuple[Path, dict], tmp_path: Path) -> None:
    out1, manifest1 = sharded
    # --no-fsync changes durability only: not the bytes, not the manifest, not the resume digest.
    manifest2 = shard(corpus, tmp_path, "--samples-per-shard", "16", "--workers", "2", "--val-fraction", "0.2",
                      "--no-fsync")
    assert len(tar_bytes(out1)) == manifest1["num_shards"] > 4
    assert tar_bytes(out1) == tar_bytes(tmp_path)
    assert manifest1 == manifest2
    assert (out1 / "errors.jsonl").read_bytes() == (tmp_path / "errors.jsonl").read_bytes()


def test_manifest_counts_and_split(corpus: Path, sharded: tuple[Path, dict]) -> None:
    out, m = sharded
    listed = sum(1 for p in corpus.rglob("*") if p.is_file())
    assert m["num_samples"] + m["num_rejected"] == m["source"]["num_items"] == listed
    assert m["num_rejected"] == len(BAD_INPUTS)
    assert set(m["splits"]) == {"train", "val"}
    assert 0 < m["splits"]["val"]["num_samples"] < m["splits"]["train"]["num_samples"]
    assert m["class_names"] == sorted(p.name for p in corpus.iterdir())
    names = [s["name"] for s in m["splits"]["val"]["shards"]]
    assert names[0] == "data-val-000000.tar" and list(wds.shardlists.expand_urls(m["splits"]["val"]["pattern"])) == names


def test_errors_jsonl_names_every_bad_input(sharded: tuple[Path, dict]) -> None:
    out, _ = sharded
    lines = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_name = {Path(r["source"]).name: r for r in lines}
    assert set(by_name) == set(BAD_INPUTS)
    for name, reason in BAD_INPUTS.items():
        assert reason in by_name[name]["reason"], by_name[name]
        assert by_name[name]["shard"].endswith(".tar")


def test_standard_webdataset_reader(corpus: Path, sharded: tuple[Path, dict]) -> None:
    out, m = sharded
    urls = [str(out / s["name"]) for split in m["splits"].values() for s in split["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls", "json")
    seen = 0
    for image, cls, meta in ds:
        assert isinstance(image, Image.Image) and image.size == tuple(meta["size"])
        assert m["class_names"][cls] == meta["label"] == Path(meta["source"]).parts[0]
        seen += 1
    assert seen == m["num_samples"]


def test_shuffle_mixes_classes_and_no_shuffle_keeps_order(corpus: Path, sharded: tuple[Path, dict], tmp_path: Path) -> None:
    out, m = sharded
    first = m["splits"]["train"]["shards"][0]["name"]
    labels = [cls for _, cls in wds.WebDataset(str(out / first), shardshuffle=False).to_tuple("__key__", "cls")]
    assert len(set(labels)) >= 3, "a shuffled shard should hold several classes"
    m2 = shard(corpus, tmp_path, "--samples-per-shard", "16", "--no-shuffle")
    keys = [k for split in m2["splits"].values() for s in split["shards"]
            for (k,) in wds.WebDataset(str(tmp_path / s["name"]), shardshuffle=False).to_tuple("__key__")]
    assert keys == sorted(keys)


def test_max_shard_bytes_and_resize(corpus: Path, foolbox_data: Path, tmp_path: Path) -> None:
    limit = 200_000
    m = shard(corpus, tmp_path / "small", "--max-shard-bytes", str(limit), "--samples-per-shard", "1000")
    sizes = [s["bytes"] for s in m["splits"]["train"]["shards"]]
    assert len(sizes) > 3 and max(sizes) <= limit + 10240  # tar end-of-archive record
    m = shard(corpus, tmp_path / "resized", "--resize-short-side", "64", "--no-shuffle")
    urls = [str(tmp_path / "resized" / s["name"]) for s in m["splits"]["train"]["shards"]]
    checked = passed = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        ext = "jpg" if "jpg" in sample else "png"
        if min(meta["original_size"]) > 64:
            assert ext == "jpg" and min(Image.open(io.BytesIO(sample[ext])).size) == 64  # re-encoded, still JPEG
            checked += 1
        else:
            assert sample[ext] == (corpus / meta["source"]).read_bytes()  # small images pass through untouched
            passed += 1
    assert passed == 80
    assert checked == 21  # 20 ImageNet JPEGs + trailer.jpg


def test_manifest_sources_csv_and_jsonl(foolbox_data: Path, tmp_path: Path) -> None:
    images = sorted(foolbox_data.glob("imagenet_*.jpg"))[:6]
    rows = [f"{p},{p.name.split('_')[2].split('.')[0]},extra{i}" for i, p in enumerate(images)]
    (tmp_path / "list.csv").write_text("path,label,note\n" + "\n".join(rows) + "\nmissing.jpg,1,x\n")
    m = shard(tmp_path / "list.csv", tmp_path / "csv")
    assert m["num_samples"] == 6 and m["num_rejected"] == 1
    assert "unreadable" in (tmp_path / "csv" / "errors.jsonl").read_text()
    (tmp_path / "sub").mkdir()
    for p in images[:3]:
        shutil.copy(p, tmp_path / "sub" / p.name)
    (tmp_path / "list.jsonl").write_text("".join(
        json.dumps({"path": f"sub/{p.name}", "label": "cat" if i % 2 else "dog"}) + "\n" for i, p in enumerate(images[:3])))
    m = shard(tmp_path / "list.jsonl", tmp_path / "jsonl")
    assert m["class_names"] == ["cat", "dog"] and m["num_samples"] == 3
    metas = [meta for (meta,) in wds.WebDataset(str(tmp_path / "jsonl" / "data-000000.tar"),
                                                shardshuffle=False).decode().to_tuple("json")]
    assert sorted(meta["label"] for meta in metas) == ["cat", "dog", "dog"]


def test_bad_source_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert shard_main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_idx(fashion_mnist: Path, tmp_path: Path) -> None:
    """A 600-image slice of the real t10k files, written back as IDX, round-trips pixel-exactly."""
    images = read_idx(fashion_mnist / "t10k-images-idx3-ubyte.gz")[:600]
    labels = read_idx(fashion_mnist / "t10k-labels-idx1-ubyte.gz")[:600]
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    names = "tshirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot"
    m = shard(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "out", "--class-names", names,
              "--samples-per-shard", "250", "--val-fraction", "0.1", "--prefix", "fmnist")
    assert m["num_samples"] == 600 and m["class_names"][9] == "boot"
    assert [s["name"] for s in m["splits"]["val"]["shards"]] == ["fmnist-val-000000.tar"]
    urls = [str(tmp_path / "out" / s["name"]) for sp in m["splits"].values() for s in sp["shards"]]
    for img, cls, meta in wds.WebDataset(urls, shardshuffle=False).decode("pill").to_tuple("png", "cls", "json"):
        index = int(meta["source"].rsplit("#", 1)[1])
        assert img.mode == "L" and np.array_equal(np.array(img), images[index]) and cls == labels[index]


def _partial_run(src: Path, out: Path, args: list[str]) -> int:
    """Start the CLI, kill -9 it once a few shards are complete; returns how many were."""
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.shard", "--src", str(src), "--out", str(out),
                             "--no-progress", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    state = out / ".shard-state"
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_dir() and len(list(state.glob("*.tar.json"))) >= 3:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make the corpus larger"
    return len(list(state.glob("*.tar.json")))


@pytest.mark.parametrize("durability", [[], ["--no-fsync"]], ids=["fsync", "no-fsync"])
def test_kill9_then_rerun_equals_uninterrupted(foolbox_data: Path, tmp_path: Path, durability: list[str]) -> None:
    src = build_corpus(tmp_path / "src", foolbox_data, copies=4)
    args = ["--samples-per-shard", "4", "--check", "decode", "--workers", "1", *durability]
    done = _partial_run(src, tmp_path / "killed", args)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    result = subprocess.run([sys.executable, "-m", "data_tools.shard", "--src", str(src), "--out",
                             str(tmp_path / "killed"), "--no-progress", *args], capture_output=True, text=True, check=True)
    assert f"({done} already complete)" in result.stdout, result.stdout
    shard(src, tmp_path / "clean", *args)
    assert tar_bytes(tmp_path / "killed") == tar_bytes(tmp_path / "clean")
    assert not list((tmp_path / "killed").glob("*.tmp-*"))
    assert not list((tmp_path / "killed" / ".shard-state" / "tmp").iterdir())  # the killed run's temporaries
    assert (tmp_path / "killed" / "manifest.json").read_text() == (tmp_path / "clean" / "manifest.json").read_text()


def test_rerun_reuses_matching_shards_and_rewrites_changed_ones(corpus: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    m = shard(corpus, tmp_path, "--samples-per-shard", "16")
    first = tar_bytes(tmp_path)
    capsys.readouterr()
    shard(corpus, tmp_path, "--samples-per-shard", "16")
    assert f"({m['num_shards']} already complete)" in capsys.readouterr().out
    shard(corpus, tmp_path, "--samples-per-shard", "40")
    captured = capsys.readouterr()
    assert "(0 already complete)" in captured.out and "not part of this plan" in captured.err
    assert tar_bytes(tmp_path)["data-000000.tar"] != first["data-000000.tar"]


def test_shard_tar_writer_through_hashed_file_is_a_standard_tar(tmp_path: Path) -> None:
    """The sharder streams ShardTarWriter's output through HashedFile: the bytes on disk must equal
    the same writer's in memory, whatever the member sizes (batch boundaries, GNU long-name entries
    for long or non-ASCII names), the digest must be the sha256 of exactly those bytes, and both
    Python's tarfile and GNU tar must list every member with its exact content."""
    rng = np.random.default_rng(0)
    samples = []
    for i, stem in enumerate(["a", "k" * 95, "long" * 40, "caf\u00e9"]):
        for size in (0, 1, 511, 512, 513, int(rng.integers(1000, 300_000)), 5 << 20):
            samples.append({"__key__": f"{i:03d}_{size}_{stem}", "jpg": rng.bytes(size), "cls": b"7",
                            "json": b'{"a": 1}'})
    reference = io.BytesIO()
    with ShardTarWriter(reference, **TAR_OWNER) as tw:
        for sample in samples:
            tw.write(sample)
    sink = HashedFile(tmp_path / "streamed.tar")
    with ShardTarWriter(sink, **TAR_OWNER) as tw:
        for sample in samples:
            tw.write(sample)
    digest = sink.close(fsync=True)
    written = (tmp_path / "streamed.tar").read_bytes()
    assert written == reference.getvalue()
    assert digest == hashlib.sha256(written).hexdigest() and sink.size == len(written)
    expected = {f"{s['__key__']}.{k}": v for s in samples for k, v in s.items() if k != "__key__"}
    with tarfile.open(tmp_path / "streamed.tar") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == expected
        assert all(m.mtime == 0 and m.uname == "root" and m.mode == 0o444 for m in tar.getmembers())
    listed = subprocess.run(["tar", "tf", str(tmp_path / "streamed.tar")], check=True, capture_output=True,
                            text=True).stdout.splitlines()
    assert sorted(listed) == sorted(expected)
