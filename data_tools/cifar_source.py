"""CIFAR-10 / CIFAR-100 "python version" pickles as a shard source.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html):

- CIFAR-10 `cifar-10-batches-py/`: `data_batch_1` .. `data_batch_5` (train, 10k images each),
  `test_batch` (10k), `batches.meta` (`label_names`).
- CIFAR-100 `cifar-100-python/`: `train` (50k), `test` (10k), `meta` (`fine_label_names`,
  `coarse_label_names`). Samples get the fine label (100 classes); the coarse one goes into the
  sample's json as `coarse_label`.

Each batch is a pickled dict: `data`, a uint8 (N, 3072) array whose rows are the red, green and
blue 32x32 planes in row-major order, `labels` (CIFAR-10) or `fine_labels` (CIFAR-100), and
`filenames`. The files were written by Python 2's cPickle, so they are read with
`encoding="latin1"` (as torchvision does), and through an unpickler that only resolves the few
numpy globals an array needs: a pickle is a program, and a downloaded one must not be able to
run anything else.

`python -m data_tools.shard --src DIR --split train|test` (or `--src` one batch file, e.g.
`test_batch`): like the IDX source, one run shards one split into its own folder; each image is
encoded as a PNG with Pillow's defaults (lossless, deterministic), so the shards are ordinary
WebDataset shards with `png`, `cls` and `json` members.

`python -m data_tools.cifar --src DIR --out OUT` does both splits in one process: OUT/<kind>-train
(1000 images a shard, shuffled) and OUT/<kind>-test (250 a shard, in order), each verified against
its manifest, then prints the two brace patterns for `data.train_shards` / `data.val_shards`.
"""
from __future__ import annotations

import bisect
import codecs
import io
import pickle
import re
from pathlib import Path

import numpy as np

from data_tools.items import Item, SourceError

SPLITS = ("train", "test")
SIDE, CHANNELS = 32, 3
ROW = SIDE * SIDE * CHANNELS  # 3072
PNG_OVERHEAD = 128  # signature, IHDR, IDAT/IEND framing and zlib's stored-block worst case
PLANNED_SIZE = SIDE * (1 + SIDE * CHANNELS) + PNG_OVERHEAD  # filter byte per row: an upper bound
_CIFAR10_BATCH = re.compile(r"data_batch_(\d+)|test_batch")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """What an array pickle may name: numpy 1 (`numpy.core`) and 2 (`numpy._core`) spellings of
    the array/scalar reconstructors, plus `_codecs.encode`, which Python 3 uses for bytes at
    protocol 2. The objects are taken from numpy itself, not imported by those names."""
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.uint8(0).__reduce__()[0]
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                            ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    return table


class _ArrayUnpickler(pickle.Unpickler):
    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_pickle(path: Path) -> dict:
    """One CIFAR pickle as a dict with str keys (bytes keys, as Python 3 re-dumps may have, are decoded)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a bad or hostile file
        raise SourceError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a CIFAR pickle (holds a {type(obj).__name__}, expected a dict)")
    return {_text(k): v for k, v in obj.items()}


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def is_cifar(src: Path) -> bool:
    """A CIFAR folder (`batches.meta`, or `meta` beside `train`/`test`) or one of its batch files."""
    if src.is_dir():
        return (src / "batches.meta").is_file() or ((src / "meta").is_file() and
                                                     any((src / s).is_file() for s in SPLITS))
    return src.is_file() and (_CIFAR10_BATCH.fullmatch(src.name) is not None or
                              (src.name in SPLITS and (src.parent / "meta").is_file()))


def _batch_files(root: Path, split: str | None) -> list[Path]:
    if split not in SPLITS:
        raise SourceError(f"{root} is a CIFAR folder: pass --split train or --split test "
                          "(or --src one batch file, e.g. test_batch)")
    if (root / "batches.meta").is_file():  # CIFAR-10
        if split == "test":
            files = [root / "test_batch"]
        else:
            numbered = [(int(m.group(1)), p) for p in root.iterdir()
                        if (m := re.fullmatch(r"data_batch_(\d+)", p.name)) and p.is_file()]
            files = [p for _, p in sorted(numbered)]
    else:  # CIFAR-100
        files = [root / split]
    missing = [p.name for p in files if not p.is_file()]
    if not files or missing:
        raise SourceError(f"{root}: no {split} batch file{(' ' + ', '.join(missing)) if missing else 's'} "
                          f"(expected data_batch_N / test_batch, or train / test)")
    return files


class CifarSource:
    """The images of one CIFAR split (or one batch file), listed in batch-file then row order."""

    def __init__(self, src: Path, split: str | None = None, class_names: list[str] | None = None) -> None:
        if src.is_dir():
            self.root, files = src, _batch_files(src, split)
        else:
            if split is not None:
                raise SourceError(f"{src}: --split selects batches of a CIFAR folder; this is one batch file")
            self.root, files = src.parent, [src]
        meta_path = next((p for p in (self.root / "batches.meta", self.root / "meta") if p.is_file()), None)
        meta = load_pickle(meta_path) if meta_path else {}
        self._batches: list[np.ndarray] = []  # (N, 3, 32, 32) uint8 per file, kept for read()
        self._offsets: list[int] = []
        self.items: list[Item] = []
        fine = None
        coarse_names = [_text(n) for n in meta.get("coarse_label_names", [])]
        for path in files:
            batch = load_pickle(path)
            images = self._images(path, batch)
            fine = "fine_labels" in batch if fine is None else fine
            key = "fine_labels" if fine else "labels"
            labels = batch.get(key)
            if labels is None or len(labels) != len(images):
                raise SourceError(f"{path}: expected {len(images)} `{key}`, got "
                                  f"{'none' if labels is None else len(labels)}")
            names = batch.get("filenames") or [None] * len(images)
            coarse = batch.get("coarse_labels") if fine else None
            self._offsets.append(len(self.items))
            self._batches.append(images)
            for row, label in enumerate(labels):
                extra = {"filename": _text(names[row])} if names[row] is not None else {}
                if coarse is not None:
                    c = int(coarse[row])
                    extra["coarse_label"] = coarse_names[c] if c < len(coarse_names) else str(c)
                self.items.append(Item(len(self.items), f"{path.name}#{row}", int(label), PLANNED_SIZE, extra))
        self.kind = "cifar100" if fine else "cifar10"
        labels = [it.label for it in self.items]
        top = max(labels) + 1
        meta_names = [_text(n) for n in meta.get("fine_label_names" if fine else "label_names", [])]
        self.class_names = list(class_names or meta_names or [str(i) for i in range(top)])
        if min(labels) < 0 or top > len(self.class_names):
            raise SourceError(f"{files[0].parent}: labels span {min(labels)}..{top - 1} but "
                              f"{len(self.class_names)} class names are known")

    @staticmethod
    def _images(path: Path, batch: dict) -> np.ndarray:
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 2 or len(data) == 0 or \
                data[0].size != ROW:
            what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise SourceError(f"{path}: `data` must be a uint8 (N, 3072) array of 32x32 RGB planes, got {what}")
        return np.ascontiguousarray(data).reshape(len(data), CHANNELS, SIDE, SIDE)

    def read(self, item: Item) -> bytes:
        from PIL import Image

        b = bisect.bisect_right(self._offsets, item.index) - 1
        pixels = self._batches[b][item.index - self._offsets[b]].transpose(1, 2, 0)  # CHW planes -> HWC
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        return buf.getvalue()
