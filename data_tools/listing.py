"""Listing helpers that never lose an input silently: a folder walk that reports what it cannot
list, and the label rules of CSV / JSONL manifests.

Folder walk: `os.walk` skips unreadable folders without a word (its default `onerror` is None),
and a non-UTF-8 file name, a dangling symlink or a symlink loop surfaced later as a traceback
that did not name the file. `walk_class` returns every regular file plus one (path, reason)
per thing it could not list, which the sharder turns into errors.jsonl lines.

Labels: a label column is either all integers (class indices) or all names. Anything in between
(a header row that was not recognised, a float, a boolean, names that differ only in case or
spacing) is one SourceError naming the line, because each of these silently scrambled classes:
a CSV from a spreadsheet starts with a byte-order mark, its header was read as a data row, and
every label became a class *name* sorted as text (13 classes for labels 0..11, img10 -> class 2).
"""
from __future__ import annotations

import errno
import os
import re
import stat
import unicodedata
from collections.abc import Sequence


class LabelError(ValueError):
    """A label column that does not resolve to class indices unambiguously."""


def printable(path: str) -> str:
    """A path as UTF-8 text: bytes that are not UTF-8 (kept by os as surrogates) become `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def walk_class(root: str, name: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Under `root/name`: ([(relative posix path, size)] of regular files, [(relative path, reason)]
    for what could not be listed), both in pathlib order (component by component). Hidden
    entries (leading dot) are skipped by design; symlinks are followed, loops reported."""
    files: list[tuple[str, int]] = []
    problems: list[tuple[str, str]] = []
    top = os.path.join(root, name)
    try:
        start = os.stat(top)
    except OSError as e:
        return [], [(name + "/", _stat_problem(top, e))]
    stack = [(name, top, ((start.st_dev, start.st_ino),))]  # (relative, absolute, ancestor ids)
    while stack:
        rel_dir, abs_dir, ancestors = stack.pop()
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((printable(rel_dir) + "/", f"unreadable folder ({e.strerror or e}): its files are "
                                                       "not listed"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}"
            if not is_utf8(entry.name):
                problems.append((printable(rel), "file name is not valid UTF-8 (shard metadata is UTF-8 JSON): "
                                                 "rename it"))
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as e:
                problems.append((rel, _stat_problem(entry.path, e)))
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    target = printable(os.readlink(entry.path)) if entry.is_symlink() else "?"
                    problems.append((rel + "/", f"symlink loop (-> {target}, a folder above it): not followed"))
                else:
                    stack.append((rel, entry.path, (*ancestors, ident)))
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, st.st_size))
            else:
                problems.append((rel, f"{_kind(st.st_mode)}, not an image file"))
    key = lambda pair: pair[0].split("/")  # noqa: E731
    return sorted(files, key=key), sorted(problems, key=key)


def _stat_problem(path: str, e: OSError) -> str:
    if os.path.islink(path):
        target = os.readlink(path)
        if e.errno == errno.ELOOP:
            return f"symlink loop (-> {printable(target)})"
        if e.errno == errno.ENOENT:
            return f"dangling symlink (-> {printable(target)})"
    return f"unreadable ({e.strerror or e})"


# ---------------------------------------------------------------------------------------- labels
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _classify(value: object) -> tuple[str, int | str]:
    """("int", index) or ("name", name); LabelError for values that are neither unambiguously."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise LabelError(f"label {value!r} is neither an integer class index nor a class name")
    if isinstance(value, int):
        return "int", value
    if isinstance(value, float):
        raise LabelError(f"label {value!r} is a number but not an integer class index")
    text = str(value).strip()
    if not text:
        raise LabelError("empty label")
    if _INT.fullmatch(text):
        return "int", int(text)
    if _NUMBER.fullmatch(text):
        raise LabelError(f"label {text!r} is a number but not an integer class index (a spreadsheet's 1.0?)")
    return "name", text


def _fold(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def resolve_labels(labels: Sequence[tuple[str, object]], class_names: list[str] | None) -> tuple[list[int], list[str]]:
    """(class index per row, class names) from `(where, raw label)` rows; `where` is `file:line`.

    Integers are indices (names from `class_names`, else their digits); names are indexed in
    `class_names` order, else sorted. Every ambiguity is a LabelError naming its line.
    """
    if class_names is not None:
        seen: dict[str, str] = {}
        for n in class_names:
            if _fold(n) in seen:
                raise LabelError(f"--class-names: {seen[_fold(n)]!r} and {n!r} name the same class")
            seen[_fold(n)] = n
    kinds: list[tuple[str, str, int | str]] = []
    for where, raw in labels:
        try:
            kinds.append((where, *_classify(raw)))
        except LabelError as e:
            raise LabelError(f"{where}: {e}") from None
    ints = [k for k in kinds if k[1] == "int"]
    names = [k for k in kinds if k[1] == "name"]
    if ints and names:
        few, many = (names, ints) if len(names) <= len(ints) else (ints, names)
        what = {"int": "an integer", "name": "a name"}
        hint = " (an unrecognised header row? it must read `path,label`)" if few[0] is kinds[0] else ""
        raise LabelError(f"{few[0][0]}: label {few[0][2]!r} is {what[few[0][1]]} but {len(many)} other labels are "
                         f"{what[many[0][1]]}s (e.g. {many[0][0]}: {many[0][2]!r}){hint}; a label column must be "
                         "all integer class indices or all class names")
    if ints:
        for where, _, index in ints:
            if index < 0 or (class_names is not None and index >= len(class_names)):
                bound = f"< {len(class_names)} class names" if class_names is not None else ">= 0"
                raise LabelError(f"{where}: label {index} is not a class index {bound}")
        top = max(i for _, _, i in ints) + 1
        return [int(i) for _, _, i in ints], list(class_names or [str(i) for i in range(top)])
    first: dict[str, tuple[str, str]] = {}
    for where, _, name in names:
        folded = _fold(str(name))
        if folded in first and first[folded][1] != name:
            raise LabelError(f"{where}: label {name!r} differs from {first[folded][1]!r} ({first[folded][0]}) only "
                             "in case or spacing; use one spelling per class")
        first.setdefault(folded, (where, str(name)))
    ordered = list(class_names) if class_names is not None else sorted({str(n) for _, _, n in names})
    lookup = {n: i for i, n in enumerate(ordered)}
    for where, _, name in names:
        if name not in lookup:
            raise LabelError(f"{where}: label {name!r} is not among the {len(ordered)} class names")
    return [lookup[str(n)] for _, _, n in names], ordered
