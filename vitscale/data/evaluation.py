"""The finite evaluation pass: every sample exactly once across ranks and workers.

Shards, not samples, are split: reader r = rank * workers + worker takes shards r, r + R, ...
(R = world_size x workers). With fewer shards than readers some reader would get nothing,
and the rank that runs out first would leave its peers waiting in a collective (the DDP hang
webdataset warns about), so that case is refused up front with the counts in the message.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data.checks import ShardList, check_val_shards
from vitscale.data.config import parse_data_config
from vitscale.data.samples import DEFAULT_IMAGE_KEY, DEFAULT_LABEL_KEY, SampleFields
from vitscale.data.shards import ShardReadError, iter_raw_samples
from vitscale.data.stream import BadShardsError
from vitscale.data.transforms import EvalTransform, Normalizer, stack_batch

log = logging.getLogger(__name__)


def reader_shards(urls: list[str], reader: int, readers: int) -> list[str]:
    """The shards reader `reader` of `readers` (rank * workers + worker) reads."""
    return urls[reader::readers]


class _EvalShardReader(IterableDataset):
    def __init__(self, urls: list[str], *, batch_size: int, rank: int, world_size: int,
                 img_size: int, in_chans: int, crop_pct: float, expected: dict[str, int] | None = None,
                 fields: SampleFields | None = None) -> None:
        self.urls, self.batch_size, self.rank, self.world_size = urls, batch_size, rank, world_size
        self.in_chans, self.expected = in_chans, expected or {}
        self.fields = fields or SampleFields()
        self.transform = EvalTransform(img_size, crop_pct, in_chans)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        for url in reader_shards(self.urls, reader, readers):
            try:
                for sample in iter_raw_samples(url, self.expected.get(url)):
                    label = self.fields.label(sample)  # SampleError: a bad shard, as in training
                    ext, data = self.fields.image(sample)
                    try:
                        image = self.transform(data, ext)
                    except Exception as e:
                        log.warning("eval: skipping sample %s in %s: %s", sample.get("__key__"), url, e)
                        yield {"_skipped": sample.get("__key__"), "_error": f"{url}: {e}"}
                        continue
                    images.append(image)
                    labels.append(label)
                    keys.append(sample["__key__"])
                    if len(images) == self.batch_size:
                        yield self._batch(images, labels, keys)
                        images, labels, keys = [], [], []
            except ShardReadError as e:
                yield {"_bad_shard": url, "_error": str(e)}
        if images:
            yield self._batch(images, labels, keys)

    @staticmethod
    def _batch(images: list[torch.Tensor], labels: list[int], keys: list[str]) -> dict:
        return {"image": stack_batch(images), "label": torch.tensor(labels, dtype=torch.long), "key": keys}


class EvalLoader:
    """Iterable of `{"image", "label", "key"}` batches; the last batch of a reader may be short.

    A shard that fails to read, or holds another number of samples than its manifest.json says,
    is logged and counted; past `max_bad_shards` it raises. After a pass, `count` is the samples
    this rank yielded and `expected` what the manifests list for this rank's shards (None when
    a shard has no manifest); a difference is logged as an error with its causes, so a top-1
    over part of the set is never reported quietly.
    """

    def __init__(self, reader: _EvalShardReader, normalize: Normalizer, num_workers: int, max_bad_shards: int,
                 shard_list: ShardList | None = None) -> None:
        self.reader, self.normalize = reader, normalize
        self.num_workers, self.max_bad_shards = num_workers, max_bad_shards
        self.bad_shards: list[str] = []
        self.skipped: list[str] = []
        self.count = 0
        self.expected: int | None = None
        if shard_list is not None:
            workers = max(1, num_workers)
            mine = [u for w in range(workers)
                    for u in reader_shards(shard_list.urls, reader.rank * workers + w, reader.world_size * workers)]
            self.expected = shard_list.expected_total(mine)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.bad_shards, self.skipped, self.count = [], [], 0
        loader = DataLoader(self.reader, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
        for item in loader:
            if "_skipped" in item:
                self.skipped.append(item["_error"])
                continue
            if "_bad_shard" in item:
                self.bad_shards.append(item["_bad_shard"])
                log.error("eval: bad shard %d/%d allowed: %s", len(self.bad_shards), self.max_bad_shards, item["_error"])
                if len(self.bad_shards) > self.max_bad_shards:
                    raise BadShardsError(f"{len(self.bad_shards)} eval shards failed to read (or held samples not "
                                         "matching data.image_key / data.label_key), more than "
                                         f"max_bad_shards={self.max_bad_shards}; last: {item['_error']}")
                continue
            self.count += len(item["key"])
            yield {"image": self.normalize(item["image"]), "label": item["label"], "key": item["key"]}
        if self.expected is not None and self.count != self.expected:
            log.error("eval: rank %d evaluated %d samples but manifest.json lists %d for its shards (%d bad shards: "
                      "%s; %d undecodable samples: %s): metrics cover part of the set", self.reader.rank, self.count,
                      self.expected, len(self.bad_shards), self.bad_shards[:3], len(self.skipped), self.skipped[:3])


def build_eval_loader(urls: Any, *, batch_size: int, rank: int, world_size: int, img_size: int, in_chans: int,
                      num_workers: int, cfg_data: Mapping | Any | None = None,
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                      crop_pct: float | None = None, max_bad_shards: int | None = None,
                      image_key: str | None = None, label_key: str | None = None) -> EvalLoader:
    """`urls`: brace pattern or list. mean / std / crop_pct / max_bad_shards / image_key / label_key
    come from the explicit arguments, else from `cfg_data` (the `data` config group), else
    (0.5, 0.875, 0, "auto", "cls"). Labels are checked against `cfg_data.num_classes` when given."""
    cfg = parse_data_config(cfg_data) if cfg_data is not None else None
    max_bad = max_bad_shards if max_bad_shards is not None else (cfg.max_bad_shards if cfg else 0)
    shard_list = check_val_shards(cfg, world_size=world_size, num_workers=num_workers, urls=urls,
                                  max_bad_shards=max_bad)
    shards = shard_list.urls
    mean = mean or (cfg.mean if cfg else (0.5,) * in_chans)
    std = std or (cfg.std if cfg else (0.5,) * in_chans)
    crop_pct = crop_pct if crop_pct is not None else (cfg.eval_crop_pct if cfg else 0.875)
    fields = SampleFields(image_key or (cfg.image_key if cfg else DEFAULT_IMAGE_KEY),
                          label_key or (cfg.label_key if cfg else DEFAULT_LABEL_KEY),
                          cfg.num_classes if cfg else None)  # ValueError on a malformed key, before any worker
    reader = _EvalShardReader(shards, batch_size=batch_size, rank=rank, world_size=world_size,
                              img_size=img_size, in_chans=in_chans, crop_pct=crop_pct, expected=shard_list.expected,
                              fields=fields)
    return EvalLoader(reader, Normalizer(tuple(mean), tuple(std), in_chans), num_workers, max_bad, shard_list)
