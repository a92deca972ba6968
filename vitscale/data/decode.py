"""Image bytes -> uint8 (H, W, C) array with the channel count the model's stem expects.

`open_image` reads the header once (size, the pixel-count limit) and returns an `EncodedImage`
whose `decode` makes the one decoding pass; nothing is opened or parsed twice per sample.

- JPEG goes through simplejpeg when it is installed (about 2x Pillow on one core here), with
  Pillow as the fallback for anything simplejpeg refuses (CMYK, arithmetic coding, ...).
  simplejpeg can also scale inside the IDCT: callers that know the smallest size they need
  (`min_size`) pass it and skip part of the decoding work. Only the power-of-two scales (1/2, 1/4,
  1/8) are used: libjpeg-turbo's other M/8 scales run a generic IDCT and cost *more* than a full
  decode (measured here on the 512-px test photos: full 2.78 ms, 7/8 3.35, 3/4 2.98, 5/8 2.77,
  1/2 2.55, 1/4 ~2.45, 1/8 2.30 ms of CPU per image).
- PNG: the size comes from the IHDR chunk (no Pillow open); 8-bit grey or RGB whose channels are
  what the model takes (or grey for a 3-channel model, replicated) is decoded by torchvision's
  libpng op, 0.037 vs 0.078 ms per 28-px Fashion-MNIST image for Pillow's open + load. The op is
  called directly: torchvision 0.29 deprecated `torchvision.io.decode_png` (it warns on every
  call, ~10 us); when a later torchvision drops the op, Pillow takes over. Other PNGs (palette,
  alpha, 16-bit, a channel conversion) go through Pillow, as every other format.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import torch
from PIL import Image

from data_tools.shard_format import check_pixel_count, eight_bit

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes everything, only slower
    simplejpeg = None

try:  # torchvision's libpng op, without torchvision.io.decode_png's per-call deprecation warning
    import torchvision.io  # noqa: F401  (registers torch.ops.image)

    _decode_png_op = torch.ops.image.decode_png
    _UNCHANGED = torchvision.io.ImageReadMode.UNCHANGED.value
except (ImportError, AttributeError, RuntimeError):  # gone from a later torchvision: Pillow decodes PNGs
    _decode_png_op = None

JPEG_EXTS = ("jpg", "jpeg")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY, _PNG_RGB = 0, 2  # IHDR colour types the fast path takes (8 bits per sample)


def pil_mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans: expected 1 (grayscale) or 3 (RGB), got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


_POWER_OF_TWO_DIVISORS = (8, 4, 2)


def _fast_scale_minimum(size: tuple[int, int], min_size: tuple[int, int]) -> tuple[int, int]:
    """The (min_width, min_height) that makes simplejpeg pick the smallest power-of-two scale
    still covering `min_size`, or (0, 0) for a full decode (see the module docstring for why
    the in-between M/8 scales are never worth it)."""
    w, h = size
    for d in _POWER_OF_TWO_DIVISORS:
        sw, sh = -(-w // d), -(-h // d)  # libjpeg rounds scaled sizes up
        if sw >= min_size[0] and sh >= min_size[1]:
            return sw, sh
    return 0, 0


class EncodedImage:
    """One image whose header has been read: `size` = (width, height); `decode` is the only pass
    over its pixels. Construct with `open_image`."""

    __slots__ = ("data", "ext", "size", "_kind", "_pil", "_png_type")

    def __init__(self, data: bytes, ext: str) -> None:
        self.data, self.ext, self._pil, self._png_type = data, ext, None, None
        self._kind = "pil"
        size = None
        if ext in JPEG_EXTS and simplejpeg is not None:
            try:
                h, w = simplejpeg.decode_jpeg_header(data)[:2]
                size, self._kind = (w, h), "jpeg"
            except ValueError:
                pass
        elif data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 29:
            w, h = struct.unpack(">II", data[16:24])
            size, self._kind = (w, h), "png"
            if data[24] == 8 and _decode_png_op is not None:
                self._png_type = data[25]
        if size is None:
            self._pil = Image.open(io.BytesIO(data))  # lazy: header only until load()
            size = self._pil.size
        check_pixel_count(*size)
        self.size: tuple[int, int] = size

    def decode(self, in_chans: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H, W, in_chans); grayscale sources are replicated to 3 channels.

        `min_size` = (min_width, min_height): a JPEG may come back smaller than its full size, but
        never below this (DCT-domain scaling); other formats always decode at full size.
        """
        mode = pil_mode(in_chans)
        if self._kind == "jpeg":
            try:
                min_w, min_h = _fast_scale_minimum(self.size, min_size) if min_size else (0, 0)
                return simplejpeg.decode_jpeg(self.data, colorspace="GRAY" if mode == "L" else "RGB",
                                              min_width=min_w, min_height=min_h)
            except ValueError:
                pass  # unsupported JPEG flavour: Pillow below
        elif self._png_type == _PNG_GREY or (self._png_type == _PNG_RGB and in_chans == 3):
            chw = _decode_png_op(torch.frombuffer(bytearray(self.data), dtype=torch.uint8), _UNCHANGED, False)
            if chw.shape[0] in (1, in_chans):
                return chw.permute(1, 2, 0).expand(-1, -1, in_chans).numpy()
        img = self._pil if self._pil is not None else Image.open(io.BytesIO(self.data))
        img = eight_bit(img)  # 16-bit grey scaled, not clipped at 255
        if img.mode != mode:
            img = img.convert(mode)
        arr = np.array(img)  # writable: torch.from_numpy shares it
        return arr[:, :, None] if arr.ndim == 2 else arr


def open_image(data: bytes, ext: str) -> EncodedImage:
    """Read the header: size, and more pixels than data_tools.shard accepts (`MAX_IMAGE_PIXELS`)
    is an UnsupportedPixels error naming the size."""
    return EncodedImage(data, ext)


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """(width, height) from the header alone (see `open_image`)."""
    return open_image(data, ext).size


def decode_image(data: bytes, ext: str, in_chans: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """`open_image(data, ext).decode(in_chans, min_size)`: one header read, one decoding pass."""
    return open_image(data, ext).decode(in_chans, min_size)


def find_image(sample: dict) -> tuple[str, bytes]:
    """The (extension, bytes) of a raw WebDataset sample's image member."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image member (expected one of {IMAGE_EXTS})")
