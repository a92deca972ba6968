"""CIFAR-10/100 python-pickle source and the cifar10_vit experiment, on real CIFAR pixels.

The data sets cannot be installed offline, so the tests write CIFAR-format pickles from the 20
CIFAR-10 and 20 CIFAR-100 PNGs that foolbox ships (real test images, label in the file name):
CIFAR-10 as the original Python-2 cPickle files are laid out (protocol 2, `numpy.core` globals,
py2 `str` bytes, loaded with encoding="latin1"), CIFAR-100 as a Python 3 re-dump would be
(`numpy._core` globals). Then: pixel- and label-exact shards through data_tools.shard, a
hostile pickle refused, and `scripts/cifar10_vit.sh` (shard, verify, train) run for a few steps.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cifar import CifarSource, is_cifar
from data_tools.shard import main as shard_main
from data_tools.sources import SourceError
from data_tools.verify import main as verify_main

REPO = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Name:
    """A global as a Python 2 pickle names it (`numpy.core.multiarray` under numpy 2 too)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:  # pickle's save_reduce wants a callable
        raise NotImplementedError


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its save() is overridable
    """Writes what Python 2's cPickle wrote at protocol 2: str as BINSTRING, arrays through
    numpy.core.multiarray._reconstruct with their bytes as a BINSTRING."""

    def __init__(self, f: io.BufferedWriter) -> None:
        super().__init__(f, protocol=2)

    def save(self, obj, save_persistent_id=True) -> None:  # noqa: ANN001
        if isinstance(obj, _Py2Name):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, (str, bytes)):
            raw = obj.encode("latin1") if isinstance(obj, str) else obj
            head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else \
                pickle.BINSTRING + struct.pack("<i", len(raw))
            self.write(head + raw)
        elif isinstance(obj, np.dtype):
            self.save_reduce(_Py2Name("numpy", "dtype"), (obj.str[1:], 0, 1),
                             state=(3, "|", None, None, None, -1, -1, 0), obj=obj)
        elif isinstance(obj, np.ndarray):
            self.save_reduce(_Py2Name("numpy.core.multiarray", "_reconstruct"), (_Py2Name("numpy", "ndarray"), (0,), "b"),
                             state=(1, obj.shape, obj.dtype, False, obj.tobytes()), obj=obj)
        else:
            super().save(obj, save_persistent_id)


def _pngs(foolbox_data: Path, family: str) -> list[tuple[str, int, np.ndarray]]:
    """(file name, label, HWC uint8 pixels) of foolbox's `<family>_<NN>_<label>.png` files, in order."""
    out = []
    for p in sorted(foolbox_data.glob(f"{family}_*.png")):
        pixels = np.asarray(Image.open(p).convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        out.append((p.name, int(p.stem.rsplit("_", 1)[1]), pixels))
    return out


def _batch(samples: list[tuple[str, int, np.ndarray]], label_key: str) -> dict:
    # CIFAR rows: the R plane, then G, then B, each 32x32 row-major.
    data = np.stack([px.transpose(2, 0, 1).reshape(-1) for _, _, px in samples]).astype(np.uint8)
    return {"data": data, label_key: [lab for _, lab, _ in samples], "batch_label": "made by test_cifar",
            "filenames": [name for name, _, _ in samples]}


def write_cifar10(root: Path, foolbox_data: Path) -> tuple[Path, list, list]:
    """`cifar-10-batches-py/`: data_batch_1 (8 images), data_batch_2 (8), test_batch (4), batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    samples = _pngs(foolbox_data, "cifar10")
    train, test = samples[:16], samples[16:]
    files = {"data_batch_1": _batch(train[:8], "labels"), "data_batch_2": _batch(train[8:], "labels"),
             "test_batch": _batch(test, "labels"),
             "batches.meta": {"num_cases_per_batch": 8, "label_names": CIFAR10_NAMES, "num_vis": 3072}}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            _Py2Pickler(f).dump(obj)
    return folder, train, test


def write_cifar100(root: Path, foolbox_data: Path) -> tuple[Path, list, list]:
    """`cifar-100-python/`: train (16), test (4), meta; a plain Python 3 pickle (numpy._core globals)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    samples = _pngs(foolbox_data, "cifar100")
    train, test = samples[:16], samples[16:]
    for name, part in (("train", train), ("test", test)):
        batch = _batch(part, "fine_labels")
        batch["coarse_labels"] = [lab // 5 for _, lab, _ in part]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return folder, train, test


def read_shards(out: Path) -> dict[str, dict]:
    """Every sample of every tar in `out`, read with tarfile: key -> {png, cls, json}."""
    samples: dict[str, dict] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def shard(src: Path, out: Path, *extra: str) -> dict:
    assert shard_main(["--src", str(src), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory: pytest.TempPathFactory, foolbox_data: Path) -> tuple[Path, list, list]:
    return write_cifar10(tmp_path_factory.mktemp("c10"), foolbox_data)


def test_fixture_is_a_cifar_pickle_as_the_standard_loaders_read_it(cifar10: tuple[Path, list, list]) -> None:
    """The fixture is what torchvision's loader (pickle.load(f, encoding="latin1")) and the CIFAR
    page's own recipe (encoding="bytes") read, and it names the numpy 1 module as the original files do."""
    folder, train, _ = cifar10
    raw = (folder / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    latin1 = pickle.loads(raw, encoding="latin1")
    assert latin1["labels"] == [lab for _, lab, _ in train[:8]] and latin1["data"].shape == (8, 3072)
    as_bytes = pickle.loads(raw, encoding="bytes")
    assert np.array_equal(as_bytes[b"data"], latin1["data"])
    assert pickle.loads((folder / "batches.meta").read_bytes(), encoding="latin1")["label_names"] == CIFAR10_NAMES


def test_cifar10_splits_shard_pixel_and_label_exact(cifar10: tuple[Path, list, list], tmp_path: Path) -> None:
    folder, train, test = cifar10
    assert is_cifar(folder) and is_cifar(folder / "test_batch") and not is_cifar(folder.parent)
    for split, expected, per_shard in (("train", train, 5), ("test", test, 3)):
        out = tmp_path / split
        manifest = shard(folder, out, "--split", split, "--prefix", f"cifar10-{split}",
                         "--samples-per-shard", str(per_shard))
        # Named as the IDX source names a split run: <prefix>-NNNNNN.tar under one split entry.
        n_shards = -(-len(expected) // per_shard)
        assert manifest["source"]["kind"] == "cifar10" and manifest["class_names"] == CIFAR10_NAMES
        assert manifest["num_samples"] == len(expected) and manifest["num_rejected"] == 0
        entry = manifest["splits"]["train"]
        assert [s["name"] for s in entry["shards"]] == [f"cifar10-{split}-{i:06d}.tar" for i in range(n_shards)]
        assert entry["pattern"] == (f"cifar10-{split}-{{000000..{n_shards - 1:06d}}}.tar" if n_shards > 1
                                    else f"cifar10-{split}-000000.tar")
        samples = read_shards(out)
        assert len(samples) == len(expected)
        by_name = {name: (lab, px) for name, lab, px in expected}
        for key, s in samples.items():
            meta = json.loads(s["json"])
            label, pixels = by_name[meta["filename"]]
            assert int(s["cls"]) == label and meta["label"] == CIFAR10_NAMES[label]
            assert meta["format"] == "PNG" and meta["size"] == [32, 32]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), pixels), key
        assert verify_main([str(out), "--decode"]) == 0
    # The train split lists data_batch_1 then data_batch_2, rows in order.
    assert [it.ref for it in CifarSource(folder, "train").items][7:9] == ["data_batch_1#7", "data_batch_2#0"]


def test_one_batch_file_and_cifar100(foolbox_data: Path, cifar10: tuple[Path, list, list], tmp_path: Path) -> None:
    folder, _, test = cifar10
    manifest = shard(folder / "test_batch", tmp_path / "one", "--no-shuffle")
    assert manifest["num_samples"] == len(test) and manifest["class_names"] == CIFAR10_NAMES

    c100, train, _ = write_cifar100(tmp_path / "src", foolbox_data)
    out = tmp_path / "c100"
    manifest = shard(c100, out, "--split", "train", "--prefix", "cifar100-train", "--samples-per-shard", "8")
    assert manifest["source"]["kind"] == "cifar100" and manifest["num_classes"] == 100
    samples = read_shards(out)
    by_name = {name: (lab, px) for name, lab, px in train}
    assert len(samples) == len(train)
    for s in samples.values():
        meta = json.loads(s["json"])
        label, pixels = by_name[meta["filename"]]
        assert int(s["cls"]) == label and meta["label"] == f"fine{label}" and meta["coarse_label"] == f"coarse{label // 5}"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), pixels)


def test_both_splits_in_one_process_any_worker_count_and_rerun(foolbox_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """`python -m data_tools.cifar`: CIFAR-100 train + test shards, verified, patterns printed; the forked
    writers (--workers 2) give the same bytes as one process; a rerun reuses every shard."""
    from data_tools.cifar import main as cifar_main

    c100, train, test = write_cifar100(tmp_path / "src", foolbox_data)
    args = ["--src", str(c100), "--train-per-shard", "5", "--test-per-shard", "2", "--no-progress"]
    assert cifar_main([*args, "--out", str(tmp_path / "w1")]) == 0
    printed = capsys.readouterr().out
    assert f"train: {tmp_path / 'w1' / 'cifar100-train'}/cifar100-train-{{000000..000003}}.tar" in printed
    assert f"test: {tmp_path / 'w1' / 'cifar100-test'}/cifar100-test-{{000000..000001}}.tar" in printed
    assert cifar_main([*args, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for split in ("train", "test"):
        one, two = tmp_path / "w1" / f"cifar100-{split}", tmp_path / "w2" / f"cifar100-{split}"
        assert {p.name: p.read_bytes() for p in one.glob("*.tar")} == {p.name: p.read_bytes() for p in two.glob("*.tar")}
    assert len(read_shards(tmp_path / "w1" / "cifar100-train")) == len(train)
    capsys.readouterr()
    assert cifar_main([*args, "--out", str(tmp_path / "w1")]) == 0
    assert "this run wrote 0 images in 0 shards (4 already complete)" in capsys.readouterr().out
    assert cifar_main(["--src", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


class _Exploit:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("echo pwned > /dev/null",))


def test_bad_inputs_are_one_clear_error(cifar10: tuple[Path, list, list], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    folder, _, _ = cifar10
    assert shard_main(["--src", str(folder), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "pass --split train or --split test" in capsys.readouterr().err

    hostile = tmp_path / "evil" / "cifar-10-batches-py"
    hostile.mkdir(parents=True)
    (hostile / "batches.meta").write_bytes((folder / "batches.meta").read_bytes())
    (hostile / "test_batch").write_bytes(pickle.dumps({"data": _Exploit()}, protocol=2))
    with pytest.raises(SourceError, match=r"refusing to load global (posix|os)\.system"):
        CifarSource(hostile, "test")

    (hostile / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(SourceError, match=r"uint8 \(N, 3072\) array"):
        CifarSource(hostile, "test")
    (hostile / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
    with pytest.raises(SourceError, match=r"labels span 0..10 but 10 class names"):
        CifarSource(hostile, "test")
    with pytest.raises(SourceError, match="--split applies to a CIFAR folder only"):
        from data_tools.sources import open_source

        open_source(tmp_path, split="train")


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_cifar10_vit_composes_to_the_documented_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-Ti/4 on 32 px RGB: an 8 x 8 grid, 5.36M parameters, 365M MACs (the figures in the YAML)."""
    from vitscale.config import resolve_model
    from vitscale.models import create_model
    from vitscale.models.flops import macs_per_image

    monkeypatch.setenv("CIFAR10_TRAIN_SHARDS", "/s/cifar10-train-{000000..000049}.tar")
    cfg = _compose("+experiment=cifar10_vit")
    assert cfg.data.train_shards == "/s/cifar10-train-{000000..000049}.tar" and cfg.data.val_shards is None
    mcfg = resolve_model(cfg, num_classes=cfg.data.num_classes)
    model = create_model(**mcfg.to_dict())
    assert (mcfg.img_size, mcfg.patch_size, mcfg.in_chans, mcfg.num_classes) == (32, 4, 3, 10)
    assert mcfg.grid_size == (8, 8)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 5.36
    assert round(macs_per_image(model) / 1e6) == 365
    assert cfg.trainer.max_steps * cfg.trainer.global_batch_size / 50_000 == pytest.approx(200, abs=0.5)
    assert (cfg.data.augment.mixup, cfg.data.augment.label_smoothing, cfg.optim.schedule.name) == \
        (0.8, 0.1, "warmup_cosine")
    c100 = _compose("+experiment=cifar10_vit", "data=cifar100")
    assert c100.data.num_classes == 100 and c100.model.patch_size == 4


@pytest.mark.slow
def test_one_command_shards_verifies_and_trains(cifar10: tuple[Path, list, list], tmp_path: Path) -> None:
    """`scripts/cifar10_vit.sh DIR` with the experiment's own model (ViT-Ti/4, RandAugment, mixup/cutmix,
    label smoothing) and only the length, batch and side outputs made small: 2 steps of 2 images."""
    folder, train, test = cifar10
    work = tmp_path / "work"
    env = {**os.environ, "CIFAR_WORK": str(work), "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu",
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "NPROC": "1"}
    overrides = ["trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
                 "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.precision=fp32", "data.num_workers=0",
                 "eval.batch_size=4", "tracking.enabled=false", "tracking.figures=false", "trainer.peak_flops=1e11"]
    proc = subprocess.run(["bash", str(REPO / "scripts" / "cifar10_vit.sh"), str(folder), *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for split, n in (("train", len(train)), ("test", len(test))):
        manifest = json.loads((work / "shards" / f"cifar10-{split}" / "manifest.json").read_text())
        assert manifest["num_samples"] == n and manifest["source"]["kind"] == "cifar10"
    out = work / "cifar10_vit"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [r["eval/count"] for r in records if "eval/count" in r] == [len(test)]
    resolved = (out / ".hydra" / "config.yaml").read_text()
    assert "patch_size: 4" in resolved and "cifar10-train-000000.tar" in resolved
    assert any((out / "export").iterdir())
