"""Per-sample augmentation that is a pure function of (image, seed), and per-batch finishing.

Exact resume needs augmented pixels to depend only on the sample's position in the stream.
torchvision's and timm's transforms draw from the global torch / `random` / numpy generators,
so each sample runs inside `seeded_rngs(seed)`, which seeds those three and restores them after:
the training process's own RNG streams (dropout, init) are untouched even with num_workers=0.
"""
from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.functional import interpolate
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vitscale.data.config import AugmentConfig
from vitscale.data.decode import decode_image, image_size

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer coordinates (blake2b of their packed bytes: well mixed, stable
    across versions, a microsecond per call where numpy's SeedSequence takes ~10x longer)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


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


def _crop_box_in(decoded: np.ndarray, full: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a full-resolution box, mapped into a DCT-downscaled decode."""
    sy, sx = decoded.shape[0] / full[1], decoded.shape[1] / full[0]
    top, left, h, w = box
    t, l = min(round(top * sy), decoded.shape[0] - 1), min(round(left * sx), decoded.shape[1] - 1)
    return t, l, max(1, min(round(h * sy), decoded.shape[0] - t)), max(1, min(round(w * sx), decoded.shape[1] - l))


def _at_least_one_pixel(box: tuple[int, int, int, int], full: tuple[int, int]) -> tuple[int, int, int, int]:
    """timm's sampler rounds small crops of tiny images (1x1, 3x1, ...) to 0 pixels: clamp the
    (top, left, h, w) box to >= 1 pixel inside the image (a no-op for every other box)."""
    top, left, h, w = box
    h, w = max(1, min(h, full[1])), max(1, min(w, full[0]))
    return min(top, full[1] - h), min(left, full[0] - w), h, w


def _chw(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) view without a copy (channels-last strides, which torch's
    antialiased uint8 resize kernel prefers when they are also contiguous)."""
    return torch.from_numpy(array).permute(2, 0, 1)


class TrainTransform:
    """RandomResizedCrop (timm's sampler) + horizontal flip (+ timm RandAugment), deterministic given a seed.

    The crop box is drawn from the header size before decoding, so a JPEG is decoded only at the
    smallest DCT scale that still leaves the crop at least `img_size` pixels on each side (same
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

    def __call__(self, data: bytes, ext: str, seed: int) -> torch.Tensor:
        """Encoded bytes -> uint8 (C, img_size, img_size)."""
        full = image_size(data, ext)
        # Without RandAugment only `random` is drawn from (timm's crop sampler, the flip).
        with seeded_rngs(seed, numpy=self.randaugment is not None, torch_rng=self.randaugment is not None):
            # timm's sampler (Python `random`, as timm trains): torchvision's costs ~10 tensor ops.
            box = _at_least_one_pixel(RandomResizedCropAndInterpolation.get_params(
                torch.empty(1, 1, 1).expand(1, full[1], full[0]), self.aug.scale, self.aug.ratio), full)
            flip = self.aug.hflip > 0 and random.random() < self.aug.hflip
            min_size = None
            if self.dct_scaling:
                min_size = (-(-full[0] * self.size // box[3]), -(-full[1] * self.size // box[2]))
            decoded = decode_image(data, ext, self.in_chans, min_size)
            top, left, h, w = _crop_box_in(decoded, full, box)
            # torch's kernel directly: bit-identical to torchvision's resized_crop (checked in
            # tests) without its dispatch layers. The crop is made contiguous channels-last first:
            # only then does torch take its vectorised uint8 path (a strided crop view falls back
            # to the generic kernel; measured 0.20 vs 0.31 ms for a 350-px crop, the copy 0.02 ms).
            crop = _chw(decoded)[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
            img = interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
            if flip:
                img = F.horizontal_flip(img)
            if self.randaugment is not None:
                img = F.pil_to_tensor(self.randaugment(F.to_pil_image(img)))
        return img  # channels-last strides: `stack_batch` makes the one copy


class EvalTransform:
    """Resize the short side to img_size / crop_pct, then center-crop img_size (timm / big_vision).
    JPEGs are decoded at the smallest DCT scale whose short side still reaches that resize."""

    def __init__(self, img_size: int, crop_pct: float, in_chans: int) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data.eval_crop_pct: expected 0 < crop_pct <= 1, got {crop_pct}")
        self.size, self.in_chans = img_size, in_chans
        self.resize = max(img_size, round(img_size / crop_pct))

    def __call__(self, data: bytes, ext: str) -> torch.Tensor:
        w, h = image_size(data, ext)
        short = min(w, h)
        decoded = decode_image(data, ext, self.in_chans, (-(-w * self.resize // short), -(-h * self.resize // short)))
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
