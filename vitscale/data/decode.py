"""Image bytes -> uint8 (H, W, C) array with the channel count the model's stem expects.

JPEG goes through simplejpeg when it is installed (about 2x Pillow on one core here), with
Pillow as the fallback for anything simplejpeg refuses (CMYK, arithmetic coding, ...).
simplejpeg can also scale inside the IDCT: callers that know the smallest size they need
(`min_size`) pass it and skip part of the decoding work. Only the power-of-two scales (1/2, 1/4,
1/8) are used: libjpeg-turbo's other M/8 scales run a generic IDCT and cost *more* than a full
decode (measured here on the 512-px test photos: full 2.78 ms, 7/8 3.35, 3/4 2.98, 5/8 2.77,
1/2 2.55, 1/4 ~2.45, 1/8 2.30 ms of CPU per image).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_tools.shard_format import check_pixel_count, eight_bit

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes everything, only slower
    simplejpeg = None

JPEG_EXTS = ("jpg", "jpeg")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def pil_mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans: expected 1 (grayscale) or 3 (RGB), got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """(width, height) from the header alone; more pixels than data_tools.shard accepts
    (`MAX_IMAGE_PIXELS`) is an UnsupportedPixels error naming the size."""
    size = None
    if ext in JPEG_EXTS and simplejpeg is not None:
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            size = w, h
        except ValueError:
            pass
    if size is None:
        size = Image.open(io.BytesIO(data)).size
    check_pixel_count(*size)
    return size


_POWER_OF_TWO_DIVISORS = (8, 4, 2)


def _fast_scale_minimum(data: bytes, min_size: tuple[int, int]) -> tuple[int, int]:
    """The (min_width, min_height) that makes simplejpeg pick the smallest power-of-two scale
    still covering `min_size`, or (0, 0) for a full decode (see the module docstring for why
    the in-between M/8 scales are never worth it)."""
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    for d in _POWER_OF_TWO_DIVISORS:
        sw, sh = -(-w // d), -(-h // d)  # libjpeg rounds scaled sizes up
        if sw >= min_size[0] and sh >= min_size[1]:
            return sw, sh
    return 0, 0


def decode_image(data: bytes, ext: str, in_chans: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to uint8 (H, W, in_chans); grayscale sources are replicated to 3 channels.

    `min_size` = (min_width, min_height): a JPEG may come back smaller than its full size, but
    never below this (DCT-domain scaling); other formats always decode at full size.
    """
    mode = pil_mode(in_chans)
    if ext in JPEG_EXTS and simplejpeg is not None:
        try:
            min_w, min_h = _fast_scale_minimum(data, min_size) if min_size else (0, 0)
            return simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB",
                                          min_width=min_w, min_height=min_h)
        except ValueError:
            pass  # unsupported JPEG flavour: Pillow below
    img = eight_bit(Image.open(io.BytesIO(data)))  # 16-bit grey scaled, not clipped at 255
    if img.mode != mode:
        img = img.convert(mode)
    arr = np.array(img)  # writable: torch.from_numpy shares it
    return arr[:, :, None] if arr.ndim == 2 else arr


def find_image(sample: dict) -> tuple[str, bytes]:
    """The (extension, bytes) of a raw WebDataset sample's image member."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image member (expected one of {IMAGE_EXTS})")
