"""The infinite, resampled training stream with exact, O(one shard) resume.

Each (rank, logical worker) owns an infinite sequence of shard *draws*. Draw i picks its shard
with replacement from a generator seeded by (seed, rank, worker, i), and shuffles the shard's
samples inside windows of `shuffle_buffer` samples with a generator seeded by (seed, rank, worker,
i, window). A sample's augmentation is seeded by (seed, rank, worker, i, offset). So the position
(i, offset) alone determines everything that follows: resuming re-opens one shard per worker and
skips `offset` raw tar members without decoding them, whatever the number of steps done.

torch's DataLoader takes batches from its workers round-robin, starting at worker 0. Every batch
carries its logical worker id and that worker's position after the batch; the main process keeps
both, so it knows each worker's position and which worker is next. A resumed loader maps physical
worker 0 to that next logical worker, and the round-robin continues exactly.

Batches are assembled in the workers (a batch may span two draws), travel as uint8 and are
normalised and mixed (timm Mixup, seeded by the batch index) in the main process.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data.checks import check_train_shards
from vitscale.cpu_threads import cpu_loader_worker_init
from vitscale.data.config import DataConfig, parse_data_config
from vitscale.data.samples import SampleFields
from vitscale.data.shards import ShardReadError, iter_raw_samples
from vitscale.data.transforms import BatchMixer, Normalizer, TrainTransform, derive_seed, stack_batch

log = logging.getLogger(__name__)

STATE_FORMAT = "vitscale.data.TrainLoader/1"
_DRAW, _WINDOW, _AUGMENT, _MIX = 0, 1, 2, 3  # stream tags inside derive_seed
_LAYOUT_KEYS = ("world_size", "num_workers", "batch_size")  # may change on an elastic resume (remapped)


class BadShardsError(RuntimeError):
    """More shards failed to read than `data.max_bad_shards` allows."""


class _TrainShardStream(IterableDataset):
    """Runs in each DataLoader worker; yields batch dicts and bad-shard events, each stamped
    with its logical worker id and that worker's position after the item."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, rank: int, seed: int,
                 img_size: int, in_chans: int, positions: dict[int, tuple[int, int]], rotation: int,
                 expected: dict[str, int] | None = None) -> None:
        self.urls, self.cfg, self.batch_size = urls, cfg, batch_size
        self.expected = expected or {}  # url -> sample count from its manifest.json
        self.rank, self.seed, self.in_chans = rank, seed, in_chans
        self.positions, self.rotation = positions, rotation
        self.transform = TrainTransform(img_size, cfg.augment, cfg.mean, in_chans)
        self.fields = SampleFields(cfg.image_key, cfg.label_key, cfg.num_classes)
        self.window = max(1, cfg.shuffle_buffer)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.rotation) % count
        draw, offset = self.positions[worker]
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        barren = 0  # consecutive draws without one usable sample
        while True:
            if barren > max(100, 4 * len(self.urls)):
                raise RuntimeError(f"train stream: {barren} shard draws in a row gave no usable sample "
                                   f"(shards empty, unreadable or not images?), e.g. {self.urls[0]}")
            barren += 1
            url = self.urls[self.shard_index(worker, draw)]
            try:
                for pos, sample in self._draw_samples(url, worker, draw, offset):
                    # A sample without the configured members, or with a label that is no class index,
                    # raises SampleError (a ShardReadError): the shard is bad, like an unreadable one.
                    label = self.fields.label(sample)
                    image = self._decode(*self.fields.image(sample), sample, worker, draw, pos)
                    if image is None:
                        continue
                    barren = 0
                    images.append(image)
                    labels.append(label)
                    keys.append(sample["__key__"])
                    if len(images) == self.batch_size:
                        yield {"image": stack_batch(images), "label": torch.tensor(labels, dtype=torch.long),
                               "key": keys, "_worker": worker, "_pos": [draw, pos + 1]}
                        images, labels, keys = [], [], []
            except ShardReadError as e:
                # Pending samples are dropped with the shard so that the position after this event,
                # (draw + 1, 0), is exact: a resumed run takes the very same path.
                yield {"_bad_shard": e.url, "_error": str(e), "_dropped": len(images),
                       "_worker": worker, "_pos": [draw + 1, 0]}
                images, labels, keys = [], [], []
            draw, offset = draw + 1, 0

    def shard_index(self, worker: int, draw: int) -> int:
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, self.rank, worker, draw, _DRAW)))
        return int(rng.integers(len(self.urls)))

    def _draw_samples(self, url: str, worker: int, draw: int, offset: int) -> Iterator[tuple[int, dict]]:
        """(offset within the draw, raw sample) from `offset` on; whole windows before it are
        skipped as raw bytes, never decoded."""
        samples = iter_raw_samples(url, self.expected.get(url))
        first = offset // self.window
        for _ in islice(samples, first * self.window):
            pass
        k = first
        while window := list(islice(samples, self.window)):
            order = np.random.Generator(
                np.random.PCG64(derive_seed(self.seed, self.rank, worker, draw, _WINDOW, k))
            ).permutation(len(window)) if self.window > 1 else range(len(window))
            base = k * self.window
            for t in range(max(0, offset - base), len(window)):
                yield base + t, window[order[t]]
            k += 1

    def _decode(self, ext: str, data: bytes, sample: dict, worker: int, draw: int, pos: int) -> torch.Tensor | None:
        try:
            return self.transform(data, ext, derive_seed(self.seed, self.rank, worker, draw, pos, _AUGMENT))
        except Exception as e:  # deterministic, so skipping keeps resume exact; never silent
            log.warning("skipping sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            return None


class TrainLoader:
    """Iterable of `{"image", "label", "key"}` batches, forever; see the module docstring.

    Iterating again (or after `load_state_dict`) continues from the current position.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 img_size: int, in_chans: int) -> None:
        # Up front: missing files and shards that disagree with their manifest.json stop the run here
        # (beyond data.max_bad_shards); the manifest's sample counts are checked as each shard is read.
        self.shard_list = check_train_shards(cfg)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"train loader: bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.img_size, self.in_chans = img_size, in_chans
        self.normalize = Normalizer(cfg.mean, cfg.std, in_chans)
        self.mixer = BatchMixer(cfg.augment, cfg.num_classes, batch_size)
        self.num_streams = max(1, cfg.num_workers)
        self.positions: dict[int, tuple[int, int]] = {w: (0, 0) for w in range(self.num_streams)}
        self.next_worker = 0
        self.batches = 0
        self.bad_shards = 0

    def worker_dataset(self) -> IterableDataset:
        """What each DataLoader worker iterates, from the current position: uint8 batches plus
        bookkeeping keys. Exposed for benchmarks and debugging; training iterates the loader."""
        return _TrainShardStream(
            self.cfg.train_shards, self.cfg, batch_size=self.batch_size, rank=self.rank, seed=self.seed,
            img_size=self.img_size, in_chans=self.in_chans, positions=dict(self.positions),
            rotation=self.next_worker, expected=self.shard_list.expected)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.worker_dataset()
        workers = self.cfg.num_workers
        # Own generator: DataLoader would otherwise draw worker base seeds from the global torch RNG,
        # shifting the training process's dropout stream on every resume.
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=2 if workers else None, persistent_workers=False,
                            worker_init_fn=cpu_loader_worker_init(workers),
                            generator=torch.Generator().manual_seed(self.seed))
        for item in loader:
            worker = item.pop("_worker")
            self.positions[worker] = tuple(item.pop("_pos"))
            self.next_worker = (worker + 1) % self.num_streams
            if "_bad_shard" in item:
                self._count_bad_shard(item)
                continue
            images, labels = self.mixer(self.normalize(item["image"]), item["label"],
                                        derive_seed(self.seed, self.rank, self.batches, _MIX))
            self.batches += 1
            yield {"image": images, "label": labels, "key": item["key"]}

    def _count_bad_shard(self, event: dict) -> None:
        self.bad_shards += 1
        log.error("rank %d: bad shard %d/%d allowed: %s (%d pending samples dropped)", self.rank,
                  self.bad_shards, self.cfg.max_bad_shards, event["_error"], event["_dropped"])
        if self.bad_shards > self.cfg.max_bad_shards:
            raise BadShardsError(f"{self.bad_shards} training shards failed to read (or held samples not matching "
                                 f"data.image_key / data.label_key), more than "
                                 f"data.max_bad_shards={self.cfg.max_bad_shards}; last: {event['_error']}")

    # ---- checkpointing -------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                "batch_size": self.batch_size, "num_shards": len(self.cfg.train_shards),
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def _rank_state(self) -> dict:
        return {"positions": [list(self.positions[w]) for w in range(self.num_streams)],
                "next_worker": self.next_worker, "batches": self.batches, "bad_shards": self.bad_shards}

    def state_dict(self) -> dict:
        """Small and JSON-serialisable. Under torch.distributed with world_size > 1 this is a
        collective (all ranks must call it together) and returns every rank's position, because
        DeepSpeed stores client state from rank 0 only; `load_state_dict` picks this rank's."""
        ranks = {str(self.rank): self._rank_state()}
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, ranks[str(self.rank)]))
            ranks = {str(r): s for r, s in gathered}
        return {"format": STATE_FORMAT, **self._fingerprint(), "ranks": ranks}

    def load_state_dict(self, state: dict, *, elastic: bool = False) -> None:
        """Restore the position. With ``elastic=True`` a state written with another world size,
        number of workers or batch size is remapped (see `_remap`, docs/data.md "Resuming on another
        world size") instead of refused; seed, shard count and shuffle buffer must still match."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"train loader state: expected format {STATE_FORMAT!r}, got {state.get('format')!r}")
        layout = {k: v for k, v in self._fingerprint().items() if k in _LAYOUT_KEYS and state.get(k) != v}
        if elastic and layout:
            self._remap(state, layout)
            return
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(f"train loader state: {key}={state.get(key)!r} in the checkpoint but {value!r} "
                                 f"now; exact resume needs the same {key}")
        mine = state["ranks"].get(str(self.rank))
        if mine is None:
            raise ValueError(f"train loader state holds ranks {sorted(state['ranks'])} but this is rank {self.rank} "
                             "(call state_dict() on every rank so it can gather them)")
        self.positions = {w: (int(d), int(o)) for w, (d, o) in enumerate(mine["positions"])}
        self.next_worker, self.batches = int(mine["next_worker"]), int(mine["batches"])
        self.bad_shards = int(mine["bad_shards"])


    def _remap(self, state: dict, changed: dict[str, Any]) -> None:
        """Continue a stream whose (rank, worker) layout changed: exactness per (rank, worker) cannot
        hold, so every stream of the new layout starts at draw ``D`` = one past the furthest draw any
        old stream had begun, offset 0. A (rank, worker) that existed before therefore never re-reads a
        draw it had started (no shard list is replayed from its beginning), new ones are fresh; the
        rest of each partly read draw is abandoned. Deterministic in the checkpoint alone, and the next
        checkpoint holds exact positions again (a later resume on the same layout is exact)."""
        for key in ("seed", "num_shards", "shuffle_buffer"):
            if state.get(key) != self._fingerprint()[key]:
                raise ValueError(f"train loader state: {key}={state.get(key)!r} in the checkpoint but "
                                 f"{self._fingerprint()[key]!r} now; the stream cannot continue with another {key}")
        old = list(state["ranks"].values())
        start = 1 + max(int(d) for r in old for d, _ in r["positions"])
        self.positions = {w: (start, 0) for w in range(self.num_streams)}
        self.next_worker = 0
        self.batches = max(int(r["batches"]) for r in old)  # mixup seeds: past every old rank's
        self.bad_shards = max(int(r["bad_shards"]) for r in old)
        if self.rank == 0:
            was = ", ".join(f"{k}={state.get(k)}" for k in changed)
            now = ", ".join(f"{k}={v}" for k, v in changed.items())
            log.warning("data stream: checkpoint written with %s, now %s: positions are not exact per (rank, "
                        "worker); every stream continues at draw %d (past every draw the old streams began)",
                        was, now, start)


def build_train_loader(cfg_data: Any, *, batch_size: int, rank: int, world_size: int, seed: int,
                       img_size: int, in_chans: int) -> TrainLoader:
    """The contract in docs/ARCHITECTURE.md: `cfg_data` is the `data` config group (DictConfig or dict)."""
    return TrainLoader(parse_data_config(cfg_data), batch_size=batch_size, rank=rank, world_size=world_size,
                       seed=seed, img_size=img_size, in_chans=in_chans)
