"""The `data` config group (configs/data/*.yaml) as typed values, from a DictConfig or a dict.

Validation lives here so a bad value fails once, at build time, naming the key, instead of
inside a dataloader worker.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from webdataset.shardlists import expand_urls

from vitscale.plain import plain_dict
from vitscale.data.samples import DEFAULT_IMAGE_KEY, DEFAULT_LABEL_KEY, parse_image_key, parse_label_key


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability; `true` in YAML means 0.5
    randaugment: str | None = None  # timm spec, e.g. "rand-m9-mstd0.5-inc1"
    mixup: float = 0.0  # alpha of timm's Mixup
    cutmix: float = 0.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    train_shards: list[str]
    val_shards: list[str]
    num_classes: int
    num_workers: int = 4
    shuffle_buffer: int = 1000  # in-shard shuffle window (samples); 0 or 1 keeps shard order
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_bad_shards: int = 0
    eval_crop_pct: float = 0.875  # eval: resize short side to img_size / crop_pct, center crop
    image_key: str = DEFAULT_IMAGE_KEY  # "auto" (first of jpg/jpeg/png/webp) or member name(s), "jpg;png"
    label_key: str = DEFAULT_LABEL_KEY  # member holding the class index ("cls", "txt") or "json:label"

    @property
    def soft_labels(self) -> bool:
        a = self.augment
        return a.mixup > 0 or a.cutmix > 0 or a.label_smoothing > 0


def expand_shards(spec: str | Sequence[str] | None, key: str = "shards") -> list[str]:
    """Brace patterns (`a-{000000..000009}.tar`), `::`-joined strings, or lists of either."""
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, str):
        return expand_urls(spec)
    if isinstance(spec, Sequence):
        return [u for s in spec for u in expand_urls(str(s))]
    raise TypeError(f"data.{key}: expected a shard pattern or a list, got {type(spec).__name__}")


def _pair(value: Any, key: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(f"data.augment.{key}: expected [low, high] with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def parse_data_config(cfg: Any) -> DataConfig:
    if isinstance(cfg, DataConfig):  # parsed already (vitscale.config.validate)
        return cfg
    d = plain_dict(cfg, "data config")
    if "num_classes" not in d:
        raise ValueError("data.num_classes is required")
    aug = dict(d.get("augment") or {})
    hflip = aug.get("hflip", 0.5)
    augment = AugmentConfig(
        scale=_pair(aug.get("scale", (0.08, 1.0)), "scale"),
        ratio=_pair(aug.get("ratio", (3 / 4, 4 / 3)), "ratio"),
        hflip=(0.5 if hflip else 0.0) if isinstance(hflip, bool) else float(hflip),
        randaugment=aug.get("randaugment") or None,
        mixup=float(aug.get("mixup") or 0.0),
        cutmix=float(aug.get("cutmix") or 0.0),
        label_smoothing=float(aug.get("label_smoothing") or 0.0),
    )
    mean, std = tuple(float(m) for m in d.get("mean", (0.5,) * 3)), tuple(float(s) for s in d.get("std", (0.5,) * 3))
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"data.mean / data.std: expected equal lengths and std > 0, got {mean} / {std}")
    num_workers, buffer = int(d.get("num_workers", 4)), int(d.get("shuffle_buffer", 1000))
    if num_workers < 0 or buffer < 0:
        raise ValueError(f"data.num_workers / data.shuffle_buffer must be >= 0, got {num_workers} / {buffer}")
    image_key, label_key = d.get("image_key"), d.get("label_key")
    image_key = DEFAULT_IMAGE_KEY if image_key is None else str(image_key).strip()
    label_key = DEFAULT_LABEL_KEY if label_key is None else str(label_key).strip()
    parse_image_key(image_key), parse_label_key(label_key)  # ValueError naming the key, before any worker
    return DataConfig(
        train_shards=expand_shards(d.get("train_shards"), "train_shards"),
        val_shards=expand_shards(d.get("val_shards"), "val_shards"),
        num_classes=int(d["num_classes"]),
        num_workers=num_workers,
        shuffle_buffer=buffer,
        mean=mean,
        std=std,
        augment=augment,
        max_bad_shards=int(d.get("max_bad_shards", 0)),
        eval_crop_pct=float(d.get("eval_crop_pct", 0.875)),
        image_key=image_key,
        label_key=label_key,
    )
