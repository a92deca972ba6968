"""Decide whether input bytes are a usable image, and re-encode them only when asked to.

The default check is structural and cheap enough for pass-through sharding at disk speed:
Pillow parses the header (format, size), PNG chunks are CRC-checked up to IEND, and a JPEG
must end with its end-of-image marker (what a truncated download or copy loses). `check="decode"`
decodes every pixel as well, catching corruption inside an otherwise well-formed file.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_tools.shard_format import (PASS_MODES, UnsupportedPixels, check_pixel_count, eight_bit, mode_refusal,
                                     png_storable)

try:
    import simplejpeg
except ImportError:  # optional: Pillow parses JPEG headers too, ~25x slower
    simplejpeg = None

# Huge scans are legitimate inputs when --resize-short-side shrinks them: Pillow's own bomb check
# is off here and `shard_format.check_pixel_count` applies the readers' limit to what is stored.
Image.MAX_IMAGE_PIXELS = None

PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Formats stored as they are; anything else (GIF, BMP, TIFF, ...) is re-encoded as PNG (lossless)."""


_MAGIC = {b"\xff\xd8": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"RIFF": "WEBP", b"GIF8": "GIF"}


class RejectedImage(Exception):
    """The input is not a usable image; the message says why (it goes to errors.jsonl)."""


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    ext: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    source_format: str
    reencoded: bool


def _check_jpeg_end(data: bytes) -> None:
    """A JPEG normally ends with its end-of-image marker; a cut-off copy does not. Some cameras
    append trailers after it, so a missing marker at the end is settled by a full decode."""
    if not data.startswith(b"\xff\xd8"):
        raise RejectedImage("JPEG without start-of-image marker")
    if b"\xff\xd9" in data[-64:].rstrip(b"\x00\r\n\x1a "):
        return
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception as e:
        raise RejectedImage(f"truncated JPEG (no end-of-image marker; decode fails: {e})") from None


def inspect(data: bytes, check: str = "structure") -> Image.Image:
    """Open `data` (header only unless check == "decode") or raise RejectedImage."""
    if not data:
        raise RejectedImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        for magic, fmt in _MAGIC.items():
            if data.startswith(magic):
                raise RejectedImage(f"corrupt or truncated {fmt}: Pillow cannot parse its header") from None
        raise RejectedImage("not an image (format not recognised by Pillow)") from None
    except Exception as e:  # Pillow raises many types for malformed headers
        raise RejectedImage(f"unreadable image header: {e}") from None
    try:
        if img.format == "JPEG":
            _check_jpeg_end(data)
        elif img.format == "PNG" and check != "decode":
            Image.open(io.BytesIO(data)).verify()  # chunk CRCs through IEND, no inflate
        if check == "decode" or img.format not in PASS_THROUGH:
            img.load()
    except RejectedImage:
        raise
    except Exception as e:
        raise RejectedImage(f"corrupt or truncated {img.format}: {e}") from None
    return img


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    """`img` has been through `eight_bit`: its values are what the readers will see."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        png_storable(img).save(buf, format="PNG")
    return buf.getvalue()


def _stored_size(w: int, h: int, resize_short_side: int | None) -> tuple[int, int]:
    """Size after --resize-short-side (unchanged when the short side is already small enough)."""
    if resize_short_side is None or min(w, h) <= resize_short_side:
        return w, h
    scale = resize_short_side / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _check_pixels(w: int, h: int) -> None:
    try:
        check_pixel_count(w, h)
    except UnsupportedPixels as e:
        raise RejectedImage(str(e)) from None


def prepare(
    data: bytes,
    *,
    check: str = "structure",
    resize_short_side: int | None = None,
    reencode: bool = False,
    quality: int = 95,
) -> StoredImage:
    """Return the bytes to store: the original ones unless a resize or re-encode is needed.

    Re-encoding keeps the kind of compression (JPEG stays JPEG at `quality`, the rest become PNG)
    so a lossless corpus never silently turns lossy.
    """
    if check == "structure" and not reencode and simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:  # pass-through fast path: libjpeg-turbo reads the header in about 1 us
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
        except ValueError:
            pass  # let Pillow give the verdict and the reason
        else:
            _check_jpeg_end(data)
            if resize_short_side is None or min(w, h) <= resize_short_side:
                _check_pixels(w, h)
                return StoredImage(data, "jpg", (w, h), (w, h), "JPEG", False)
    img = inspect(data, check)
    fmt, (w, h) = img.format or "?", img.size
    size = _stored_size(w, h, resize_short_side)
    _check_pixels(*size)
    refusal = mode_refusal(img.mode)  # from the header: refused before any pixel is decoded
    if refusal:
        raise RejectedImage(f"{fmt}: {refusal}")
    if size == (w, h) and not reencode and fmt in PASS_THROUGH and img.mode in PASS_MODES:
        return StoredImage(data, PASS_THROUGH[fmt], (w, h), (w, h), fmt, False)
    try:
        img.load()
        img = eight_bit(img)  # 16-bit grey -> 8-bit, scaled: what readers would otherwise clip
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        out_fmt = "JPEG" if fmt == "JPEG" else "PNG"
        out = _encode(img, out_fmt, quality)
    except Exception as e:
        raise RejectedImage(f"cannot decode {fmt} for re-encoding: {e}") from None
    ext = "jpg" if out_fmt == "JPEG" else "png"
    return StoredImage(out, ext, (w, h), img.size, fmt, True)
