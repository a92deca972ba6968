"""Training augmentation that is a pure function of (image, seed), applied per batch, and
per-batch finishing.

Exact resume needs augmented pixels to depend only on the sample's position in the stream, so
every sample carries a 63-bit seed (`derive_seed` of its coordinates). The crop and flip are drawn
from a counter-based generator (`counter_uniforms`: splitmix64 of (seed, k), vectorised in numpy
over a batch), so a sample's crop is the same whichever batch it lands in, and a batch's 64 crops
cost one numpy pass instead of 64 Python-level samplers. timm's RandAugment draws from the global
`random` / numpy / torch generators, so it runs per sample inside `seeded_rngs(seed)`, which seeds
those three and restores them after: the training process's own RNG streams (dropout, init) are
untouched even with num_workers=0.

Work per batch (`TrainTransform.batch`): the crop boxes come from the header sizes before any
decoding (JPEGs then decode at the smallest DCT scale that still covers the crop), each image is
decoded once, and when all decoded images have one size and are small (Fashion-MNIST, CIFAR) the
resized crops and flips of the whole batch are two batched matmuls with the antialiased bilinear
weights torch's own kernel uses (`_resize_weights`); larger or mixed-size images take torch's
per-image kernel on the crop, bit-identical to torchvision's resized_crop.
"""
from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.functional import interpolate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vitscale.data.config import AugmentConfig
from vitscale.data.decode import EncodedImage, open_image

_SEED_MASK = (1 << 63) - 1
_ATTEMPTS = 10  # RandomResizedCrop's rejection-sampling attempts (torchvision, timm)
_UNIFORMS = 2 * _ATTEMPTS + 3  # (scale, log ratio) per attempt, top, left, flip
# A batch takes the batched resize when one image's two matmuls are at most this many multiply-adds
# (28 px grey: 44 k, 32 px RGB: 197 k). Above it torch's per-image kernel, which only touches the
# pixels under its filter, is cheaper (measured on 1 thread: 64 -> 32 px RGB 0.09 ms batched vs
# 0.05 per image; 28 px grey 0.013 vs 0.060, the per-image figure being mostly call overhead).
_BATCHED_RESIZE_MACS = 1 << 18


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer coordinates (blake2b of their packed bytes: well mixed, stable
    across versions, a microsecond per call where numpy's SeedSequence takes ~10x longer)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def counter_uniforms(seeds: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) float64 uniforms in [0, 1): entry (i, k) is splitmix64's output for
    (seeds[i], k), a function of that pair alone (no generator state)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(seeds, dtype=np.uint64)[:, None]
             + np.arange(1, count + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@contextmanager
def seeded_rngs(seed: int, numpy: bool = True, torch_rng: bool = True) -> Iterator[None]:
    """Seed `random` and, unless the caller knows nothing draws from them (saving a state costs
    more than drawing a crop), torch's CPU generator and numpy's global state; restore them all
    on exit. Only the CPU generator: `torch.manual_seed` would also reseed every CUDA generator.
    """
    torch_state = torch.get_rng_state() if torch_rng else None
    py_state = random.getstate()
    np_state = np.random.get_state() if numpy else None
    if torch_rng:
        torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if numpy:
        np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        if torch_state is not None:
            torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


def random_resized_crops(sizes: np.ndarray, u: np.ndarray, scale: tuple[float, float],
                         ratio: tuple[float, float]) -> np.ndarray:
    """RandomResizedCrop's sampler (torchvision / timm `get_params`: up to 10 attempts at an area
    fraction in `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop of the
    closest allowed ratio) for a batch: `sizes` (n, 2) = (width, height), `u` (n, >= 22) uniforms.
    Returns (n, 4) int64 boxes (top, left, height, width), at least one pixel each (timm's sampler
    rounds small crops of tiny images, 1x1, 3x1, ..., to 0 pixels)."""
    n = len(sizes)
    img_w, img_h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    target = (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * _ATTEMPTS:2]) * (img_w * img_h)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:2 * _ATTEMPTS:2])
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w <= img_w[:, None]) & (h <= img_h[:, None])
    first, rows = fits.argmax(1), np.arange(n)
    found = fits[rows, first]
    in_ratio = img_w / img_h
    lo, hi = min(ratio), max(ratio)
    fallback_w = np.where(in_ratio > hi, np.round(img_h * hi), img_w)
    fallback_h = np.where(in_ratio < lo, np.round(img_w / lo), img_h)
    w = np.clip(np.where(found, w[rows, first], fallback_w), 1, img_w)
    h = np.clip(np.where(found, h[rows, first], fallback_h), 1, img_h)
    top = np.where(found, np.floor(u[:, 2 * _ATTEMPTS] * (img_h - h + 1)), (img_h - h) // 2)
    left = np.where(found, np.floor(u[:, 2 * _ATTEMPTS + 1] * (img_w - w + 1)), (img_w - w) // 2)
    return np.stack([top, left, h, w], 1).astype(np.int64)


def _crop_box_in(decoded: np.ndarray, full: tuple[int, int], box: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a full-resolution box, mapped into a DCT-downscaled decode."""
    if decoded.shape[0] == full[1] and decoded.shape[1] == full[0]:
        return tuple(int(v) for v in box)  # type: ignore[return-value]
    sy, sx = decoded.shape[0] / full[1], decoded.shape[1] / full[0]
    top, left, h, w = (int(v) for v in box)
    t, l = min(round(top * sy), decoded.shape[0] - 1), min(round(left * sx), decoded.shape[1] - 1)
    return t, l, max(1, min(round(h * sy), decoded.shape[0] - t)), max(1, min(round(w * sx), decoded.shape[1] - l))


def _chw(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) view without a copy (channels-last strides, which torch's
    antialiased uint8 resize kernel prefers when they are also contiguous)."""
    return torch.from_numpy(array).permute(2, 0, 1)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """(n, out, size) rows that resize the segment [start, start + length) of a `size`-pixel axis
    to `out` pixels: torch's antialiased bilinear filter (a triangle of half-width max(1, scale)
    around each output centre, normalised over the segment's pixels), i.e. what
    `interpolate(crop, mode="bilinear", antialias=True, align_corners=False)` applies."""
    scale = length / out
    support = scale.clamp(min=1.0)
    centre = start[:, None] + (torch.arange(out, dtype=torch.float32) + 0.5)[None] * scale[:, None]
    pixel = torch.arange(size, dtype=torch.float32) + 0.5
    weights = (1 - (pixel[None, None] - centre[..., None]).abs() / support[:, None, None]).clamp_(min=0)
    inside = (pixel[None] >= start[:, None]) & (pixel[None] < (start + length)[:, None])
    weights.mul_(inside[:, None])
    return weights.div_(weights.sum(-1, keepdim=True))


class TrainTransform:
    """RandomResizedCrop + horizontal flip (+ timm RandAugment), deterministic given each sample's seed.

    `batch(images, seeds)` is what the stream calls; `__call__(data, ext, seed)` is the same for one
    sample. The crop box is drawn from the header size before decoding, so a JPEG is decoded only at
    the smallest DCT scale that still leaves the crop at least `img_size` pixels on each side (same
    resize quality, a fraction of the decode work). `dct_scaling=False` always decodes in full.
    """

    dct_scaling = True

    def __init__(self, img_size: int, aug: AugmentConfig, mean: tuple[float, ...], in_chans: int) -> None:
        self.size, self.aug, self.in_chans = img_size, aug, in_chans
        self.randaugment = None
        if aug.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(round(255 * m) for m in mean)
            self.randaugment = rand_augment_transform(aug.randaugment, {"img_mean": fill if len(fill) == 3 else fill[0]})

    # ---- the three stages ----------------------------------------------------------------------
    def plan(self, sizes: Sequence[tuple[int, int]], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes (n, 4: top, left, h, w in full-size pixels) and flips (n,) for images of
        `sizes` (width, height); a pure function of each (size, seed) pair."""
        u = counter_uniforms(seeds, _UNIFORMS)
        boxes = random_resized_crops(np.asarray(sizes, dtype=np.int64).reshape(-1, 2), u, self.aug.scale,
                                     self.aug.ratio)
        return boxes, u[:, _UNIFORMS - 1] < float(self.aug.hflip)

    def decode(self, image: EncodedImage, box: Sequence[int]) -> np.ndarray:
        """The one decoding pass, at the smallest JPEG DCT scale that keeps the crop >= img_size."""
        min_size = None
        if self.dct_scaling:
            full = image.size
            min_size = (-(-full[0] * self.size // int(box[3])), -(-full[1] * self.size // int(box[2])))
        return image.decode(self.in_chans, min_size)

    def finish(self, decoded: Sequence[np.ndarray], full_sizes: Sequence[tuple[int, int]], boxes: np.ndarray,
               flips: np.ndarray, seeds: Sequence[int]) -> torch.Tensor:
        """Decoded (H, W, C) images -> uint8 (n, C, img_size, img_size): resized crops, flips,
        RandAugment. Batched when all have one size and are small (module docstring)."""
        crops = [_crop_box_in(d, full, box) for d, full, box in zip(decoded, full_sizes, boxes)]
        shape = decoded[0].shape
        h, w, c = shape
        if (all(d.shape == shape for d in decoded)
                and c * self.size * (h * w + w * self.size) <= _BATCHED_RESIZE_MACS):
            images = self._resize_batched(decoded, crops, flips)
        else:
            images = stack_batch([self._resize_one(d, crop, bool(flip))
                                  for d, crop, flip in zip(decoded, crops, flips)])
        if self.randaugment is not None:
            out = []
            for img, seed in zip(images, seeds):
                with seeded_rngs(seed):
                    out.append(F.pil_to_tensor(self.randaugment(F.to_pil_image(img))))
            images = torch.stack(out)
        return images

    # ---- entry points --------------------------------------------------------------------------
    def batch(self, images: Sequence[EncodedImage], seeds: Sequence[int]) -> torch.Tensor:
        """Opened images -> uint8 (n, C, img_size, img_size); each decoded exactly once."""
        sizes = [image.size for image in images]
        boxes, flips = self.plan(sizes, seeds)
        decoded = [self.decode(image, box) for image, box in zip(images, boxes)]
        return self.finish(decoded, sizes, boxes, flips, seeds)

    def __call__(self, data: bytes, ext: str, seed: int) -> torch.Tensor:
        """Encoded bytes -> uint8 (C, img_size, img_size): `batch` of one."""
        return self.batch([open_image(data, ext)], [seed])[0]

    # ---- resizing ------------------------------------------------------------------------------
    def _resize_one(self, decoded: np.ndarray, crop: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        top, left, h, w = crop
        # torch's kernel directly: bit-identical to torchvision's resized_crop (checked in
        # tests) without its dispatch layers. The crop is made contiguous channels-last first:
        # only then does torch take its vectorised uint8 path (a strided crop view falls back
        # to the generic kernel; measured 0.20 vs 0.31 ms for a 350-px crop, the copy 0.02 ms).
        crop_t = _chw(decoded)[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        img = interpolate(crop_t, size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)[0]
        return F.horizontal_flip(img) if flip else img

    def _resize_batched(self, decoded: Sequence[np.ndarray], crops: Sequence[tuple[int, int, int, int]],
                        flips: np.ndarray) -> torch.Tensor:
        """Resized crops of same-size images as out = Wy @ image @ Wx^T per image (a flip reverses
        Wx's rows); matches `_resize_one` up to rounding (+-1 level)."""
        boxes = torch.tensor(crops, dtype=torch.float32)
        h, w = decoded[0].shape[:2]
        wy = _resize_weights(boxes[:, 0], boxes[:, 2], self.size, h)
        wx = _resize_weights(boxes[:, 1], boxes[:, 3], self.size, w)
        if flips.any():
            flip = torch.from_numpy(np.asarray(flips, dtype=bool))
            wx[flip] = wx[flip].flip(1)
        x = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(torch.float32)
        out = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
        return out.round_().clamp_(0, 255).to(torch.uint8)


class EvalTransform:
    """Resize the short side to img_size / crop_pct, then center-crop img_size (timm / big_vision).
    JPEGs are decoded at the smallest DCT scale whose short side still reaches that resize."""

    def __init__(self, img_size: int, crop_pct: float, in_chans: int) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data.eval_crop_pct: expected 0 < crop_pct <= 1, got {crop_pct}")
        self.size, self.in_chans = img_size, in_chans
        self.resize = max(img_size, round(img_size / crop_pct))

    def __call__(self, data: bytes, ext: str) -> torch.Tensor:
        image = open_image(data, ext)
        w, h = image.size
        short = min(w, h)
        decoded = image.decode(self.in_chans, (-(-w * self.resize // short), -(-h * self.resize // short)))
        img = F.resize(_chw(decoded), [self.resize], InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(img, [self.size, self.size])  # a view: `stack_batch` makes the copy


def stack_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (C, H, W) images -> (B, C, H, W) with channels-last strides.

    The resize leaves images channels-last, so stacking them as (H, W, C) is a plain copy; a
    contiguous (B, C, H, W) stack would transpose every image in the worker (measured 0.11 vs
    0.05 ms per 224-px image). The main process's float conversion (`Normalizer`) writes a
    contiguous batch in the same pass it makes anyway, at the cost of the contiguous case.
    """
    return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)


class Normalizer:
    """uint8 (B, C, H, W) -> float32, (x / 255 - mean) / std per channel; runs in the main
    process so batches cross process boundaries as uint8 (4x less than float32), as timm's
    prefetcher does."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int) -> None:
        if len(mean) == 1 and in_chans > 1:
            mean, std = mean * in_chans, std * in_chans
        if len(mean) != in_chans:
            raise ValueError(f"data.mean / data.std have {len(mean)} values but the model takes {in_chans} channels")
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Always a contiguous float batch, whatever the strides of `images` (see `stack_batch`)."""
        return images.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).add_(self.shift)


class BatchMixer:
    """timm's Mixup / CutMix / label smoothing, with randomness that is a function of the batch
    index (timm draws from numpy's global state, so each call runs under `seeded_rngs`)."""

    def __init__(self, aug: AugmentConfig, num_classes: int, batch_size: int) -> None:
        self.num_classes, self.smoothing = num_classes, aug.label_smoothing
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            if batch_size % 2:
                raise ValueError(f"mixup/cutmix pair samples within a batch: batch_size must be even, got {batch_size}")
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix,
                               label_smoothing=aug.label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            with seeded_rngs(seed):
                return self.mixup(images, labels)
        if self.smoothing > 0:
            from timm.data.mixup import mixup_target

            return images, mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.smoothing)
        return images, labels
