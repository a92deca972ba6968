"""Corpus listings: an ImageFolder tree, a CSV / JSONL manifest, or MNIST-style IDX files.

A source only *lists* items (path, label, planned byte size) and later reads one item's bytes.
Listing never opens images, so planning 10^9 files costs one `stat` each; images are checked by
the shard writers. The listing order is deterministic (sorted), which the shard plan relies on.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


class SourceError(ValueError):
    """The source cannot be listed (bad path, bad manifest row, mismatched IDX files)."""


@dataclass(frozen=True)
class Item:
    """One input image as listed, before it is read.

    `size` is the byte size the shard plan budgets for: the file size for files on disk
    (exact for pass-through), an upper-bound estimate for IDX images encoded on the fly.
    """

    index: int
    ref: str
    label: int
    size: int
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class Source(Protocol):
    kind: str
    root: Path
    class_names: list[str]
    items: list[Item]

    def read(self, item: Item) -> bytes: ...


def _fingerprint(kind: str, items: list[Item], class_names: list[str]) -> str:
    """Identifies the listing (paths, sizes, labels) without reading image bytes."""
    h = hashlib.sha256(json.dumps([kind, class_names]).encode())
    for it in items:
        h.update(f"{it.ref}\t{it.size}\t{it.label}\n".encode())
    return h.hexdigest()


def fingerprint(source: Source) -> str:
    return _fingerprint(source.kind, source.items, source.class_names)


class FolderSource:
    """`root/<class>/**/<file>`: classes are the sorted sub-folder names (torchvision ImageFolder order).

    Every regular, non-hidden file is listed, whatever its extension: a non-image is rejected
    into errors.jsonl by the writer instead of being skipped silently.
    """

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise SourceError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
        self.class_names = classes
        self.items = []
        for label, name in enumerate(classes):
            for rel in self._walk(self._root, name):
                self.items.append(Item(len(self.items), rel, label, os.stat(os.path.join(self._root, rel)).st_size))

    @staticmethod
    def _walk(root: str, name: str) -> list[str]:
        """Relative posix paths under `root/name`, in pathlib's order (component by component),
        without a Path object per file (listing 10^7 files is mostly this loop)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(os.path.relpath(dirpath, root)).as_posix()
            found += [f"{rel_dir}/{f}" for f in filenames if not f.startswith(".")]
        return sorted(found, key=lambda rel: rel.split("/"))

    def read(self, item: Item) -> bytes:
        with open(os.path.join(self._root, item.ref), "rb", buffering=0) as f:
            return f.read()


class ManifestSource:
    """CSV (`path,label[,extra...]`, header optional) or JSONL (`{"path":..., "label":...}`).

    Relative paths resolve against the manifest's folder. Labels are either all integers
    (class indices; names from `class_names` or the digits) or all names (indexed in sorted order).
    Extra columns are kept and written to each sample's json.
    """

    kind = "manifest"

    def __init__(self, path: Path, class_names: list[str] | None = None) -> None:
        self.root = path.parent
        rows = self._read_jsonl(path) if path.suffix == ".jsonl" else self._read_csv(path)
        if not rows:
            raise SourceError(f"{path}: manifest lists no images")
        labels = [r[1] for r in rows]
        if all(_is_int(lab) for lab in labels):
            indices = [int(lab) for lab in labels]
            top = max(indices) + 1
            names = class_names or [str(i) for i in range(top)]
            if min(indices) < 0 or top > len(names):
                raise SourceError(f"{path}: labels span 0..{top - 1} but {len(names)} class names are given")
        else:
            names = class_names or sorted({str(lab) for lab in labels})
            lookup = {n: i for i, n in enumerate(names)}
            missing = sorted({str(lab) for lab in labels} - lookup.keys())
            if missing:
                raise SourceError(f"{path}: labels {missing[:5]} are not among the class names")
            indices = [lookup[str(lab)] for lab in labels]
        self.class_names = list(names)
        self.items = []
        for (rel, _, extra), label in zip(rows, indices):
            full = (self.root / rel) if not os.path.isabs(rel) else Path(rel)
            try:
                size = full.stat().st_size
            except OSError:
                size = 0  # unreadable: the writer rejects it into errors.jsonl
            self.items.append(Item(len(self.items), rel, label, size, extra))

    @staticmethod
    def _read_csv(path: Path) -> list[tuple[str, str, dict]]:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        header = ["path", "label"]
        if rows and rows[0][:2] == ["path", "label"]:
            header, rows = rows[0], rows[1:]
        out = []
        for n, row in enumerate(rows, 2 if header != ["path", "label"] else 1):
            if len(row) < 2:
                raise SourceError(f"{path}:{n}: expected `path,label[,extra...]`, got {row!r}")
            extra = {header[i] if i < len(header) else f"col{i}": v for i, v in enumerate(row) if i >= 2}
            out.append((row[0], row[1].strip(), extra))
        return out

    @staticmethod
    def _read_jsonl(path: Path) -> list[tuple[str, str, dict]]:
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append((rec.pop("path"), rec.pop("label"), rec))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise SourceError(f"{path}:{n}: expected a JSON object with path and label ({e})") from None
        return out

    def read(self, item: Item) -> bytes:
        return (Path(item.ref) if os.path.isabs(item.ref) else self.root / item.ref).read_bytes()


def _is_int(value: object) -> bool:
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.lstrip("-").isdigit()


def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (MNIST format: magic 0x0000 | dtype | ndim, big-endian dims, data)."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path}: IDX header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


class IdxSource:
    """MNIST / Fashion-MNIST `*-images-idx3-ubyte[.gz]` + its `*-labels-idx1-ubyte[.gz]`.

    Each image is encoded as PNG with Pillow's defaults (lossless, deterministic for a given
    zlib), so the demo corpus goes through the same shard format as photos do.
    """

    kind = "idx"
    PNG_OVERHEAD = 128  # signature + IHDR + IEND + zlib framing: planned size is an upper bound

    def __init__(self, images: Path, labels: Path | None = None, class_names: list[str] | None = None) -> None:
        labels = labels or Path(str(images).replace("images-idx3", "labels-idx1"))
        if labels == images or not labels.exists():
            raise SourceError(f"{images}: labels file not found (expected {labels}; pass --labels)")
        self.root = images.parent
        self.images_path, self.labels_path = images, labels
        self._images: np.ndarray | None = None
        self._labels = read_idx(labels)
        if self._labels.ndim != 1:
            raise SourceError(f"{labels}: expected a 1-d label IDX file, got shape {self._labels.shape}")
        n = len(self._labels)
        hw = self._peek_shape(images)
        if hw[0] != n:
            raise SourceError(f"{images}: {hw[0]} images but {labels} has {n} labels")
        top = int(self._labels.max()) + 1
        self.class_names = list(class_names or [str(i) for i in range(top)])
        if top > len(self.class_names):
            raise SourceError(f"{labels}: labels go up to {top - 1} but {len(self.class_names)} class names given")
        size = int(np.prod(hw[1:])) + self.PNG_OVERHEAD
        self.items = [Item(i, f"{images.name}#{i}", int(lab), size) for i, lab in enumerate(self._labels)]

    @staticmethod
    def _peek_shape(path: Path) -> tuple[int, ...]:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(4)
            return struct.unpack(f">{head[3]}I", f.read(4 * head[3]))

    def read(self, item: Item) -> bytes:
        from PIL import Image

        if self._images is None:  # loaded lazily, once per writer process
            self._images = read_idx(self.images_path)
        buf = io.BytesIO()
        Image.fromarray(self._images[item.index]).save(buf, format="PNG")
        return buf.getvalue()


def open_source(src: Path, *, labels: Path | None = None, class_names: list[str] | None = None,
                split: str | None = None) -> Source:
    """Pick the source kind from what `src` is: a folder, a .csv/.jsonl manifest, an IDX file, or CIFAR pickles."""
    if not src.exists():
        raise SourceError(f"{src}: source does not exist")
    from data_tools.cifar import CifarSource, is_cifar  # here: data_tools.cifar imports this module

    if is_cifar(src):
        return CifarSource(src, split, class_names)
    if split is not None:
        raise SourceError(f"{src}: --split applies to a CIFAR folder only")
    if src.is_dir():
        source: Source = FolderSource(src)
        if class_names and len(class_names) != len(source.class_names):
            raise SourceError(f"{src}: {len(source.class_names)} class folders but {len(class_names)} class names")
        return source
    name = src.name
    if name.endswith((".csv", ".jsonl")):
        return ManifestSource(src, class_names)
    if "idx" in name and "ubyte" in name:
        return IdxSource(src, labels, class_names)
    raise SourceError(f"{src}: expected a folder, a .csv/.jsonl manifest or an IDX images file")


def parse_class_names(value: str | None) -> list[str] | None:
    """`--class-names` is either a comma-separated list or a file with one name per line."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [v.strip() for v in value.split(",")]
