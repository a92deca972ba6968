"""Which members of a raw WebDataset sample hold the image and the label (`data.image_key`,
`data.label_key`), so shards written by other tools (img2dataset, the Hugging Face hub, ...) train
and evaluate as they are.

- `image_key`: `auto` (the first of jpg, jpeg, png, webp present, what data_tools.shard writes) or a
  member name; `;` or `,` separate alternatives tried in order (`jpg;png`).
- `label_key`: a member holding the class index as text (`cls`, the default; `txt`; `label.txt`),
  or a field of a JSON member: `json:label`, `json.label` (same), nested `json:meta.label`, or any
  JSON member `meta.json:label`.

A sample that breaks this contract (no such member or field, a label that is not an integer, one
outside [0, num_classes)) raises SampleError, a ShardReadError: the readers count the shard as bad
(`data.max_bad_shards`) with one line naming the shard, the sample, the member expected and the
members found. A misconfigured key thus stops a run at its first sample, never as a bare KeyError
deep in a worker. An image that is present but does not decode stays a skipped sample.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vitscale.data.decode import IMAGE_EXTS, JPEG_EXTS
from vitscale.data.shards import ShardReadError

DEFAULT_IMAGE_KEY = "auto"
DEFAULT_LABEL_KEY = "cls"
_LABEL_LIKE = re.compile(r"label|cls|class|target", re.IGNORECASE)
_INT = re.compile(r"[+-]?\d+")
_MEMBER = re.compile(r"[^\s:;,]+")


class SampleError(ShardReadError):
    """A sample without the configured image / label member, or with a label that is no class
    index. Raised by SampleFields; counted like an unreadable shard."""

    def __init__(self, url: str, key: str, problem: str) -> None:
        RuntimeError.__init__(self, f"{url}: sample {key} {problem}")
        self.url, self.samples_read, self.key = url, 0, key


def _members(sample: dict) -> list[str]:
    return [m for m in sample if not m.startswith("__")]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_image_key(spec: Any) -> tuple[str, ...]:
    """`auto` -> IMAGE_EXTS; `jpg;png` -> ("jpg", "png"). Member names are lower-cased like
    webdataset's grouping does. ValueError names the key."""
    text = str(spec if spec is not None else DEFAULT_IMAGE_KEY).strip()
    if text.lower() == "auto":
        return IMAGE_EXTS
    names = tuple(n.strip().lower() for n in re.split(r"[;,]", text) if n.strip())
    if not names or not all(_MEMBER.fullmatch(n) and not n.startswith("__") for n in names):
        raise ValueError(f"data.image_key: expected 'auto' or member names like 'jpg' or 'jpg;png', got {spec!r}")
    return names


def parse_label_key(spec: Any) -> tuple[str, tuple[str, ...]]:
    """(member, json field path): `cls` -> ("cls", ()), `json:label` / `json.label` ->
    ("json", ("label",)), `json:meta.label` -> ("json", ("meta", "label"))."""
    text = str(spec if spec is not None else DEFAULT_LABEL_KEY).strip()
    if ":" in text:
        member, _, path = text.partition(":")
    elif text.lower().startswith("json."):
        member, path = text[:4], text[5:]
    else:
        member, path = text, None
    member = member.strip().lower()
    fields = tuple(path.split(".")) if path is not None else ()
    if (not _MEMBER.fullmatch(member) or member.startswith("__") or (path is not None and not all(fields))
            or any(f != f.strip() for f in fields)):
        raise ValueError(f"data.label_key: expected a member ('cls', 'txt') or a json field ('json:label'), "
                         f"got {spec!r}")
    return member, fields


@dataclass(frozen=True)
class SampleFields:
    """Picks (image extension, image bytes, class index) out of a raw sample."""

    image_key: str = DEFAULT_IMAGE_KEY
    label_key: str = DEFAULT_LABEL_KEY
    num_classes: int | None = None  # labels are checked against it where known

    def __post_init__(self) -> None:
        object.__setattr__(self, "_images", parse_image_key(self.image_key))
        object.__setattr__(self, "_label", parse_label_key(self.label_key))

    # ---- image ---------------------------------------------------------------------------------
    def image(self, sample: dict) -> tuple[str, bytes]:
        """(extension the decoder goes by, bytes) of the first configured image member present."""
        for name in self._images:  # type: ignore[attr-defined]
            if name in sample:
                data = sample[name]
                ext = name.rsplit(".", 1)[-1]
                if ext not in IMAGE_EXTS:  # e.g. "image": JPEGs take the fast decoder, the rest Pillow
                    ext = JPEG_EXTS[0] if data[:3] == b"\xff\xd8\xff" else "png"
                return ext, data
        wanted = "/".join(self._images)  # type: ignore[attr-defined]
        raise SampleError(sample.get("__url__", "?"), sample.get("__key__", "?"),
                          f"has no image member '{wanted}' (members: {', '.join(_members(sample)) or 'none'}; "
                          f"data.image_key={self.image_key}); set data.image_key (python -m vitscale.evaluate: "
                          "--image-key) to the member holding the image")

    # ---- label ---------------------------------------------------------------------------------
    def label(self, sample: dict) -> int:
        member, fields = self._label  # type: ignore[attr-defined]
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        if member not in sample:
            raise SampleError(url, key, f"has no '{member}' member (members: {', '.join(_members(sample)) or 'none'}"
                              f"{self._json_fields(sample)}); {self._suggest(sample)}")
        raw = sample[member]
        if not fields:
            value = _text(raw)
            return self._index(raw if value is None else value, url, key, member)
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise SampleError(url, key, f"'{member}' member is not valid JSON ({e}); data.label_key="
                              f"{self.label_key} reads a field of it") from None
        for depth, name in enumerate(fields):
            if not isinstance(value, dict) or name not in value:
                where = ".".join(fields[:depth]) or member
                found = ", ".join(list(value)[:12]) if isinstance(value, dict) else f"a {type(value).__name__}"
                raise SampleError(url, key, f"'{member}' member has no field '{'.'.join(fields[:depth + 1])}' "
                                  f"({where} holds: {found}); {self._suggest(sample)}")
            value = value[name]
        return self._index(value, url, key, f"{member}:{'.'.join(fields)}")

    def _index(self, value: Any, url: str, key: str, where: str) -> int:
        index = _as_index(value)
        if index is None:
            raise SampleError(url, key, f"label {_short(value)} in {where} is not an integer class index "
                              f"(data.label_key={self.label_key}); {self._not_an_index_hint()}")
        if index < 0 or (self.num_classes is not None and index >= self.num_classes):
            bound = f"[0, data.num_classes={self.num_classes})" if self.num_classes is not None else "[0, ...)"
            raise SampleError(url, key, f"label {index} in {where} is outside {bound}")
        return index

    # ---- hints ---------------------------------------------------------------------------------
    @staticmethod
    def _json_fields(sample: dict) -> str:
        meta = _load_json(sample.get("json"))
        return f"; json fields: {', '.join(list(meta)[:12])}" if isinstance(meta, dict) else ""

    @staticmethod
    def _suggest(sample: dict) -> str:
        """The keys that would work on this sample: members holding an integer, and label-like
        fields (label, cls, class, target, ...) of its JSON members holding one."""
        found = [m for m in _members(sample)
                 if m not in IMAGE_EXTS and not m.endswith("json") and _as_index(_text(sample[m])) is not None]
        for m in _members(sample):
            meta = _load_json(sample[m]) if m.endswith("json") else None
            if isinstance(meta, dict):
                found += [f"{m}:{f}" for f, v in meta.items() if _LABEL_LIKE.search(f) and _as_index(v) is not None]
        where = "the member or json field holding the class index (python -m vitscale.evaluate: --label-key)"
        if found:
            also = f" (integer-valued here: {', '.join(found[:8])})" if len(found) > 1 else ""
            return f"set data.label_key={found[0]}{also}, or to {where}"
        return (f"set data.label_key to {where}, e.g. json:label; no member or label-like json field of this "
                "sample holds an integer")

    @staticmethod
    def _not_an_index_hint() -> str:
        return ("class names or captions must be mapped to indices first (python -m data_tools.shard does it from a "
                "csv / jsonl of path,label)")


def _text(raw: Any) -> Any:
    if isinstance(raw, bytes | bytearray):
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    return raw


def _load_json(raw: Any) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _as_index(value: Any) -> int | None:
    """int, integral float or integer text -> int; anything else (bool, None, names) -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    return None
