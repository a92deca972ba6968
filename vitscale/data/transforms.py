"""Per-sample augmentation that is a pure function of (image, seed), and per-batch finishing.

Exact resume needs augmented pixels to depend only on the sample's position in the stream.
torchvision's and timm's transforms draw from the global torch / `random` / numpy generators,
so each sample runs inside `seeded_rngs(seed)`, which seeds those three and restores them after:
the training process's own RNG streams (dropout, init) are untouched even with num_workers=0.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from vitscale.data.config import AugmentConfig

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer coordinates (numpy's SeedSequence hashing: well mixed, stable)."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return ((int(a) << 32) | int(b)) & _SEED_MASK


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and numpy's global state; restore them on exit.

    Only the CPU generator: `torch.manual_seed` would also reseed every CUDA generator.
    """
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8; batches travel between processes as uint8 (4x less than float32) and
    are normalised in the main process, as timm's prefetcher does."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr)


class TrainTransform:
    """RandomResizedCrop + horizontal flip (+ timm RandAugment), deterministic given a seed."""

    def __init__(self, img_size: int, aug: AugmentConfig, mean: tuple[float, ...]) -> None:
        self.size = [img_size, img_size]
        self.aug = aug
        self.randaugment = None
        if aug.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(round(255 * m) for m in mean)
            self.randaugment = rand_augment_transform(aug.randaugment, {"img_mean": fill if len(fill) == 3 else fill[0]})

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        with seeded_rngs(seed):
            top, left, h, w = RandomResizedCrop.get_params(img, list(self.aug.scale), list(self.aug.ratio))
            img = F.resized_crop(img, top, left, h, w, self.size, InterpolationMode.BILINEAR, antialias=True)
            if self.aug.hflip > 0 and torch.rand(1).item() < self.aug.hflip:
                img = F.horizontal_flip(img)
            if self.randaugment is not None:
                img = self.randaugment(img)
        return to_uint8_hwc(img)


class EvalTransform:
    """Resize the short side to img_size / crop_pct, then center-crop img_size (timm / big_vision)."""

    def __init__(self, img_size: int, crop_pct: float) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data.eval_crop_pct: expected 0 < crop_pct <= 1, got {crop_pct}")
        self.size = img_size
        self.resize = max(img_size, round(img_size / crop_pct))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = F.resize(img, [self.resize], InterpolationMode.BILINEAR, antialias=True)
        return to_uint8_hwc(F.center_crop(img, [self.size, self.size]))


class Normalizer:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), (x / 255 - mean) / std per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int) -> None:
        if len(mean) == 1 and in_chans > 1:
            mean, std = mean * in_chans, std * in_chans
        if len(mean) != in_chans:
            raise ValueError(f"data.mean / data.std have {len(mean)} values but the model takes {in_chans} channels")
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return x.mul_(self.scale).add_(self.shift).contiguous()


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
