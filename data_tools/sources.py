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
import stat
import struct
from pathlib import Path
from typing import Protocol

import numpy as np

from data_tools.cifar_source import CifarSource, is_cifar
from data_tools.items import Item, SourceError
from data_tools.listing import LabelError, is_utf8, printable, resolve_labels, walk_class




class Source(Protocol):
    kind: str
    root: Path
    class_names: list[str]
    items: list[Item]
    # Optional `unlisted: list[dict]` ({"source", "reason"}): entries outside any class (errors.jsonl).

    def read(self, item: Item) -> bytes: ...


def _fingerprint(kind: str, items: list[Item], class_names: list[str]) -> str:
    """Identifies the listing (paths, sizes, labels) without reading image bytes."""
    h = hashlib.sha256(json.dumps([kind, class_names]).encode())
    for it in items:
        h.update(f"{it.ref}\t{it.size}\t{it.label}{chr(9) + it.error if it.error else ''}\n".encode())
    return h.hexdigest()


def fingerprint(source: Source) -> str:
    return _fingerprint(source.kind, source.items, source.class_names)


class FolderSource:
    """`root/<class>/**/<file>`: classes are the sorted sub-folder names (torchvision ImageFolder order).

    Every regular, non-hidden file is listed, whatever its extension: a non-image is rejected
    into errors.jsonl by the writer instead of being skipped silently. So is everything the walk
    cannot list (unreadable folder, non-UTF-8 name, dangling symlink, symlink loop, FIFO): an
    Item with `error` set. Entries beside the class folders go to `unlisted`.
    """

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)
        self.unlisted: list[dict] = []
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise SourceError(f"{root}: cannot list the folder ({e.strerror or e})") from None
        classes = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if not is_utf8(e.name):
                raise SourceError(f"{root}: class folder {printable(e.name)!r} is not a UTF-8 name (class names go "
                                  "into UTF-8 JSON): rename it")
            if e.is_dir():
                classes.append(e.name)
            else:
                why = "dangling symlink or symlink loop" if e.is_symlink() and not os.path.exists(e.path) else \
                    "not in a class folder"
                self.unlisted.append({"source": e.name, "reason": f"{why}: not listed"})
        if not classes:
            raise SourceError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
        self.class_names = classes
        self.items = []
        for label, name in enumerate(classes):
            files, problems = walk_class(self._root, name)
            listed = [(rel, size, "") for rel, size in files] + [(rel, 0, why) for rel, why in problems]
            for rel, size, why in sorted(listed, key=lambda entry: entry[0].split("/")):
                self.items.append(Item(len(self.items), rel, label, size, error=why))

    def read(self, item: Item) -> bytes:
        with open(os.path.join(self._root, item.ref), "rb", buffering=0) as f:
            return f.read()


class ManifestSource:
    """CSV (`path,label[,extra...]`, header optional) or JSONL (`{"path":..., "label":...}`).

    Relative paths resolve against the manifest's folder. Labels are either all integers
    (class indices; names from `class_names` or the digits) or all names (indexed in sorted order);
    `listing.resolve_labels` turns every ambiguity into an error naming the line. The file is
    UTF-8, with or without the byte-order mark spreadsheets write. Extra columns are kept and
    written to each sample's json. A listed path that is not a regular file is rejected.
    """

    kind = "manifest"

    def __init__(self, path: Path, class_names: list[str] | None = None) -> None:
        self.root = path.parent
        text = self._read_text(path)
        rows = self._read_jsonl(path, text) if path.suffix == ".jsonl" else self._read_csv(path, text)
        if not rows:
            raise SourceError(f"{path}: manifest lists no images")
        try:
            indices, names = resolve_labels([(where, label) for where, _, label, _ in rows], class_names)
        except LabelError as e:
            raise SourceError(str(e)) from None
        self.class_names = names
        self.items = []
        for (_, rel, _, extra), label in zip(rows, indices):
            size, error = 0, ""
            try:
                st = self._path(rel).stat()
                size = st.st_size
                if not stat.S_ISREG(st.st_mode):
                    error = "not a regular file"
            except OSError:
                pass  # missing or unreadable: the writer rejects it into errors.jsonl with the OS's reason
            self.items.append(Item(len(self.items), rel, label, size, extra, error))

    def _path(self, rel: str) -> Path:
        return Path(rel) if os.path.isabs(rel) else self.root / rel

    @staticmethod
    def _read_text(path: Path) -> str:
        data = path.read_bytes()
        try:
            return data.decode("utf-8-sig")  # drops the byte-order mark of "CSV UTF-8"
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise SourceError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                              "save the manifest as UTF-8 (\"CSV UTF-8\")") from None

    def _read_csv(self, path: Path, text: str) -> list[tuple[str, str, str, dict]]:
        """(where, path, label, extra columns) per data row; a first row reading `path,label`
        (any case, spaces around) is the header."""
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            if row and any(c.strip() for c in row):
                rows.append((reader.line_num, row))
        header = ["path", "label"]
        if rows and [c.strip().casefold() for c in rows[0][1][:2]] == header:
            header, rows = [c.strip() for c in rows[0][1]], rows[1:]
        out = []
        for n, row in rows:
            if len(row) < 2:
                raise SourceError(f"{path}:{n}: expected `path,label[,extra...]`, got {row!r}"
                                  + (" (a `;` or tab separated file? use commas)" if len(row) == 1 and
                                     (";" in row[0] or "\t" in row[0]) else ""))
            extra = {header[i] if i < len(header) else f"col{i}": v for i, v in enumerate(row) if i >= 2}
            out.append((f"{path}:{n}", row[0], row[1], extra))
        if len(out) > 1 and header == ["path", "label"]:
            where, first, label, _ = out[0]
            if not self._path(first).exists() and all(r[2].strip() != label.strip() for r in out[1:]):
                raise SourceError(f"{where}: `{','.join([first, label])}` looks like a header row (no such file, "
                                  "and no other row has its label): a header must read `path,label[,...]`")
        return out

    @staticmethod
    def _read_jsonl(path: Path, text: str) -> list[tuple[str, str, object, dict]]:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append((f"{path}:{n}", rec.pop("path"), rec.pop("label"), rec))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise SourceError(f"{path}:{n}: expected a JSON object with path and label ({e})") from None
        return out

    def read(self, item: Item) -> bytes:
        return self._path(item.ref).read_bytes()


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
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark would join the first name
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"--class-names {path}: not a readable UTF-8 file ({e})") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [v.strip() for v in value.split(",")]
