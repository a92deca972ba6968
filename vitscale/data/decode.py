"""Image bytes -> PIL image with the channel count the model's stem expects.

JPEG goes through simplejpeg when it is installed (about 2x Pillow on one core here), with
Pillow as the fallback for anything simplejpeg refuses (CMYK, arithmetic coding, ...).
"""
from __future__ import annotations

import io

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


def decode_image(data: bytes, ext: str, in_chans: int) -> Image.Image:
    """Decode to mode "L" (in_chans 1) or "RGB" (in_chans 3; grayscale is replicated)."""
    mode = pil_mode(in_chans)
    if ext in JPEG_EXTS and simplejpeg is not None:
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB")
            return Image.fromarray(arr[:, :, 0] if mode == "L" else arr)
        except ValueError:
            pass  # unsupported JPEG flavour: Pillow below
    img = Image.open(io.BytesIO(data))
    if img.mode != mode:
        img = img.convert(mode)
    else:
        img.load()
    return img


def find_image(sample: dict) -> tuple[str, bytes]:
    """The (extension, bytes) of a raw WebDataset sample's image member."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image member (expected one of {IMAGE_EXTS})")
