"""Image bytes -> uint8 (H, W, C) array with the channel count the model's stem expects.

JPEG goes through simplejpeg when it is installed (about 2x Pillow on one core here), with
Pillow as the fallback for anything simplejpeg refuses (CMYK, arithmetic coding, ...).
simplejpeg can also decode at 1/2, 1/4 or 1/8 scale inside the IDCT: callers that know the
smallest size they need (`min_size`) pass it and skip most of the decoding work of large photos.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

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
    """(width, height) from the header alone."""
    if ext in JPEG_EXTS and simplejpeg is not None:
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            return w, h
        except ValueError:
            pass
    return Image.open(io.BytesIO(data)).size


def decode_image(data: bytes, ext: str, in_chans: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to uint8 (H, W, in_chans); grayscale sources are replicated to 3 channels.

    `min_size` = (min_width, min_height): a JPEG may come back smaller than its full size, but
    never below this (DCT-domain scaling); other formats always decode at full size.
    """
    mode = pil_mode(in_chans)
    if ext in JPEG_EXTS and simplejpeg is not None:
        min_w, min_h = min_size or (0, 0)
        try:
            return simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB",
                                          min_width=min_w, min_height=min_h)
        except ValueError:
            pass  # unsupported JPEG flavour: Pillow below
    img = Image.open(io.BytesIO(data))
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
