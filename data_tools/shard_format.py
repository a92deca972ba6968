"""What the sharder writes and every reader accepts: one definition for both sides.

`data_tools.shard`, `data_tools.verify` and `vitscale.data` import these, so the rules cannot
drift apart (they did: the sharder accepted 16-bit PNGs and unbounded pixel counts that the
reader then decoded wrongly or refused on every pass). Only Pillow, numpy and the standard
library here: the sharder must not pay for importing torch.

- Pixels: `eight_bit` is the one mode policy. Modes whose conversion to L / RGB is exact pass;
  16-bit grey is scaled to 8 bits (Pillow's own `convert("L")` clips it at 255, which turned
  a 16-bit corpus 96 % white); modes without a defined 8-bit meaning are refused with a reason.
- Size: `MAX_IMAGE_PIXELS` is Pillow's decompression-bomb threshold. Readers refuse bigger
  images, so the sharder refuses (or, with --resize-short-side, shrinks) them at sharding time.
- Tar: `iter_tar_files` is webdataset's `tar_file_iterator` plus an end check. Python's tarfile
  treats a damaged member header in the middle of a tar as the end of the archive (a half
  shard with no error); here the archive must end with its zero blocks and nothing after them.
- Manifests: `shard_manifest_entries` finds the `manifest.json` that data_tools.shard wrote
  beside local shards, so readers know each shard's sample count and byte size.
"""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's default decompression-bomb threshold (1024 * 1024 * 1024 // 4 // 3): a reader
with Pillow's defaults warns above it and fails above twice it; simplejpeg has no limit."""

PASS_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
"""Modes whose Pillow conversion to L and RGB is exact (alpha is dropped, as ImageFolder does)."""
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
REFUSED_MODES = {
    "I": "32-bit integer pixels (mode I) have no defined 8-bit scaling; convert the file to 8 or 16 bits",
    "F": "floating-point pixels (mode F) have no defined 8-bit scaling; convert the file to 8 or 16 bits",
    "LAB": "CIELAB pixels (mode LAB): Pillow cannot convert them to RGB without a colour profile",
    "HSV": "HSV pixels (mode HSV): not a stored image mode; convert the file to RGB",
}
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})
"""8-bit modes a PNG can hold; others are converted (losslessly where the mode allows) first."""


class UnsupportedPixels(ValueError):
    """The image's pixel mode or size is outside the shard format; the message says why."""


def check_pixel_count(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise UnsupportedPixels(f"{width}x{height} = {width * height} pixels, more than the readers' limit of "
                                f"{MAX_IMAGE_PIXELS} (Pillow's decompression-bomb threshold): shard with "
                                "--resize-short-side")


def mode_refusal(mode: str) -> str | None:
    """Why pixels of `mode` cannot be stored or read, or None (they pass or are scaled)."""
    if mode in PASS_MODES or mode in SIXTEEN_BIT_MODES:
        return None
    return REFUSED_MODES.get(mode, f"pixel mode {mode} is not supported")


def eight_bit(img: Image.Image) -> Image.Image:
    """`img` in a mode whose conversion to L / RGB is exact; 16-bit grey is scaled by 255/65535
    with rounding (full scale stays full scale). Raises UnsupportedPixels for the rest."""
    if img.mode in PASS_MODES:
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.uint32)  # numpy honours the byte order of I;16B
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    raise UnsupportedPixels(mode_refusal(img.mode))


def png_storable(img: Image.Image) -> Image.Image:
    """`img` (already through `eight_bit`) in a mode PNG can hold: CMYK / YCbCr / RGBX -> RGB, PA -> RGBA."""
    if img.mode in PNG_MODES:
        return img
    return img.convert("RGBA" if img.mode == "PA" else "RGB")


# ------------------------------------------------------------------------------------------- tar
class TarDamaged(tarfile.ReadError):
    """The tar stream ended somewhere other than at its end-of-archive marker."""


_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default
_BLOCK = tarfile.BLOCKSIZE


def iter_tar_files(fileobj: IO[bytes]) -> Iterator[dict]:
    """`{"fname", "data"}` for each regular member, like webdataset's `tar_file_iterator`, then
    the end check: the block where tarfile stopped and everything after it must be zeros, at
    least two blocks of them (POSIX's end-of-archive marker). Otherwise TarDamaged names the byte.

    tarfile returns "end of archive" for an invalid header anywhere but at offset 0, so without
    this check flipped bytes in a member header silently cut a shard short. The stream's
    remainder is read only up to the first non-zero byte (normally < 10 KiB of padding).
    """
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for info in stream:
        if info.isreg() and not _SKIP_META.match(info.name):
            yield {"fname": info.name, "data": stream.extractfile(info).read()}
        stream.members = []  # stream mode keeps every TarInfo otherwise
    end = stream.offset  # where the header that ended the iteration starts
    consumed = stream.fileobj.tell() - end  # 512 unless the stream stopped inside that header
    zeros = 0
    while chunk := stream.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):  # not all zeros
            first = end + consumed + zeros + len(chunk) - len(chunk.lstrip(b"\0"))
            raise TarDamaged(f"tar stream stops at byte {end} (a damaged member header?) but data follows "
                             f"at byte {first}")
        zeros += len(chunk)
    if consumed != _BLOCK or zeros < _BLOCK:
        raise TarDamaged(f"tar stream ends at byte {end + consumed + zeros} without its end-of-archive marker "
                         "(the shard is cut short)")


# ------------------------------------------------------------------------------------- manifests
def local_path(url: str) -> Path | None:
    """The file behind a local shard URL (`/x.tar`, `file:/x.tar`); None for pipe:, http(s), s3 ..."""
    if url.startswith("file:"):
        return Path(url[5:])
    if url.startswith("pipe:") or "://" in url:
        return None
    return Path(url)


class ManifestError(ValueError):
    """A manifest.json beside shards cannot be read; the message names it."""


def shard_manifest_entries(urls: Iterable[str]) -> dict[str, dict | None]:
    """For each local URL with a data_tools `manifest.json` in its folder: that manifest's entry
    for it (`name`, `num_samples`, `bytes`, `sha256`), or None when the manifest does not list it.
    URLs without a manifest beside them (or not local) are absent. Reads each manifest once."""
    manifests: dict[Path, dict[str, dict] | None] = {}
    found: dict[str, dict | None] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            continue
        folder = path.parent
        if folder not in manifests:
            manifests[folder] = _read_manifest(folder / "manifest.json")
        entries = manifests[folder]
        if entries is not None:
            found[url] = entries.get(path.name)
    return found


def _read_manifest(path: Path) -> dict[str, dict] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict) or "splits" not in manifest:
            return None  # some other tool's manifest.json: it states no shard counts
        return {s["name"]: s for split in manifest["splits"].values() for s in split["shards"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{path}: not a data_tools.shard manifest ({type(e).__name__}: {e}); "
                            "rewrite it with python -m data_tools.shard or move it away") from None
