"""The infinite, resampled training stream with exact, O(one shard) resume.

Each (rank, logical worker) owns an infinite sequence of shard *draws*. Draw i picks its shard
with replacement from a generator seeded by (seed, rank, worker, i), and shuffles the shard's
samples inside windows of `shuffle_buffer` samples with a generator seeded by (seed, rank, worker,
i, window). A sample's augmentation is seeded by (seed, rank, worker, i, offset). So the position
(i, offset) alone determines everything that follows: resuming re-opens one shard per worker and
skips `offset` raw tar members without decoding them, whatever the number of steps done.

A window can only be shuffled once it has been read whole; `_Lookahead` reads the next one (at a
shard change, the next draw's first) a few raw samples per sample handed out, so it is complete
when the current one runs out and the worker never stops for a whole window (with
`shuffle_buffer` = shard size, a whole shard). Reading ahead changes when bytes are read, never
which samples come out or in which order.

torch's DataLoader takes batches from its workers round-robin, starting at worker 0. Every batch
carries its logical worker id and that worker's position after the batch; the main process keeps
both, so it knows each worker's position and which worker is next. A resumed loader maps physical
worker 0 to that next logical worker, and the round-robin continues exactly.

Batches are assembled in the workers (a batch may span two draws): each sample's header is read
as it comes, and when a batch is full its crops are drawn together, every image is decoded once
and cropped, resized and flipped as a batch (`TrainTransform`, `_BatchBuilder`). Batches travel as
uint8 and are normalised and mixed (timm Mixup, seeded by the batch index) in the main process.
On CPU hosts a background thread receives them from the workers (`vitscale.data.handoff`); the
positions above are still recorded as training takes each batch, so prefetching never moves them.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
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
from vitscale.data.decode import EncodedImage, open_image
from vitscale.data.handoff import as_is, for_transfer, received_in_background
from vitscale.data.transforms import BatchMixer, Normalizer, TrainTransform, derive_seed

log = logging.getLogger(__name__)

STATE_FORMAT = "vitscale.data.TrainLoader/1"
_DRAW, _WINDOW, _AUGMENT, _MIX = 0, 1, 2, 3  # stream tags inside derive_seed
_LAYOUT_KEYS = ("world_size", "num_workers", "batch_size")  # may change on an elastic resume (remapped)


class BadShardsError(RuntimeError):
    """More shards failed to read than `data.max_bad_shards` allows."""


class _Lookahead:
    """The raw shuffle windows of one (rank, worker) stream, in order, read ahead.

    `take()` returns the next complete window (draw, window index, raw samples, read error);
    `read(n)` reads up to n more raw samples (or window ends) ahead, never more than one window's
    worth. The consumer calls `read` as it hands out samples, so the next window (at a shard change
    the next draw's first one) is complete when the current one runs out: the tar reading is spread
    over the batches instead of stalling the worker for a whole window at each shard change
    (75-220 ms per 5000-sample Fashion-MNIST shard, more than the two batches a worker keeps
    queued). Which samples each window holds is exactly what reading on demand gives.
    """

    def __init__(self, stream: _TrainShardStream, worker: int, draw: int, offset: int) -> None:
        self.stream, self.worker, self.size = stream, worker, stream.window
        self.draw, self.index = draw, offset // self.size  # the window being read
        self._skip = self.index * self.size  # whole windows before the resume offset: raw, never decoded
        self._samples: Iterator[dict] | None = None
        self._tail: list[dict] = []
        self._queue: deque[tuple[int, int, list[dict], ShardReadError | None]] = deque()
        self._buffered = 0  # samples in the queue and the tail

    def read(self, n: int) -> None:
        while n > 0 and self._buffered < self.size:
            n -= 1
            try:
                if self._samples is None:
                    url = self.stream.urls[self.stream.shard_index(self.worker, self.draw)]
                    self._samples = iter_raw_samples(url, self.stream.expected.get(url))
                    for _ in islice(self._samples, self._skip):
                        pass
                    self._skip = 0
                sample = next(self._samples)
            except StopIteration:
                self._complete(None, ended=True)
                continue
            except ShardReadError as e:
                self._complete(e, ended=True)
                continue
            self._tail.append(sample)
            self._buffered += 1
            if len(self._tail) == self.size:
                self._complete(None, ended=False)

    def take(self) -> tuple[int, int, list[dict], ShardReadError | None]:
        while not self._queue:
            self.read(self.size)
        window = self._queue.popleft()
        self._buffered -= len(window[2])
        return window

    def abandon(self, draw: int) -> None:
        """The consumer gave up on `draw` (a sample without the configured members): what was read
        ahead of it goes, reading goes on at the next draw, as after a read error."""
        self._buffered -= sum(len(w[2]) for w in self._queue if w[0] == draw)
        self._queue = deque(w for w in self._queue if w[0] != draw)
        if self.draw == draw:
            self._buffered -= len(self._tail)
            self._tail = []
            self._next_draw()

    def _complete(self, error: ShardReadError | None, ended: bool) -> None:
        self._queue.append((self.draw, self.index, self._tail, error))
        self._tail = []
        if ended:
            self._next_draw()
        else:
            self.index += 1

    def _next_draw(self) -> None:
        self.close()
        self.draw, self.index, self._samples, self._skip = self.draw + 1, 0, None, 0

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()  # type: ignore[attr-defined]
            self._samples = None


class _BatchBuilder:
    """Assembles one worker's batches: samples are opened (header) as they come and decoded all at
    once when the batch is full (their crops drawn together first, `TrainTransform.plan`); one that
    does not open or decode is skipped with a warning and the batch takes the next ones."""

    def __init__(self, stream: _TrainShardStream, worker: int) -> None:
        self.stream, self.worker = stream, worker
        self.transform, self.size = stream.transform, stream.batch_size
        self.pending: list[tuple[EncodedImage, int, int, dict, int]] = []  # image, seed, label, names, draw
        self.ready: list[tuple[np.ndarray, tuple[int, int], np.ndarray, bool, int, int, str]] = []
        self.alive = -1  # the last draw that gave a decoded sample

    def last_open_draw(self) -> int:
        return max((p[4] for p in self.pending), default=-1)

    def add(self, sample: dict, draw: int, pos: int) -> dict | None:
        """Take the sample at (draw, pos); the batch dict when it completes one. SampleError (a
        sample without the configured members) propagates: the shard is bad."""
        s = self.stream
        label = s.fields.label(sample)
        ext, data = s.fields.image(sample)
        seed = derive_seed(s.seed, s.rank, self.worker, draw, pos, _AUGMENT)
        try:
            image = open_image(data, ext)
        except Exception as e:  # deterministic, so skipping keeps resume exact; never silent
            _skip_warning(sample, e)
            return None
        names = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
        self.pending.append((image, seed, label, names, draw))
        if len(self.ready) + len(self.pending) < self.size:
            return None
        pending, self.pending = self.pending, []
        boxes, flips = self.transform.plan([p[0].size for p in pending], [p[1] for p in pending])
        for (image, seed, label, names, at), box, flip in zip(pending, boxes, flips):
            try:
                decoded = self.transform.decode(image, box)
            except Exception as e:
                _skip_warning(names, e)
                continue
            self.ready.append((decoded, image.size, box, bool(flip), seed, label, names["__key__"]))
            self.alive = max(self.alive, at)
        if len(self.ready) < self.size:
            return None
        ready, self.ready = self.ready, []
        images = self.transform.finish([r[0] for r in ready], [r[1] for r in ready], np.stack([r[2] for r in ready]),
                                       np.array([r[3] for r in ready]), [r[4] for r in ready])
        return {"image": for_transfer(images), "label": np.array([r[5] for r in ready], dtype=np.int64),
                "key": [r[6] for r in ready], "_worker": self.worker, "_pos": [draw, pos + 1]}

    def bad_shard(self, error: ShardReadError, draw: int) -> dict:
        """The event for a bad shard at `draw`. Pending samples are dropped with it so that the
        position after it, (draw + 1, 0), is exact: a resumed run takes the very same path."""
        dropped = len(self.pending) + len(self.ready)
        self.pending, self.ready = [], []
        return {"_bad_shard": error.url, "_error": str(error), "_dropped": dropped, "_worker": self.worker,
                "_pos": [draw + 1, 0]}


def _skip_warning(sample: dict, error: Exception) -> None:
    log.warning("skipping sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), error)


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
        reader, batch = _Lookahead(self, worker, draw, offset), _BatchBuilder(self, worker)
        batch.alive = draw - 1
        limit, seen = max(100, 4 * len(self.urls)), draw
        try:
            while True:
                draw, index, window, error = reader.take()
                # Draws in a row without one usable sample (counting the undecided ones of the batch
                # being filled as usable): the shards are empty, unreadable or not images.
                barren = draw - max(batch.alive, batch.last_open_draw())
                if draw > seen and barren > limit:
                    raise RuntimeError(f"train stream: {barren} shard draws in a row gave no usable sample "
                                       f"(shards empty, unreadable or not images?), e.g. {self.urls[0]}")
                seen = max(seen, draw)
                first, offset = max(0, offset - index * self.window), 0  # the resume offset, first window only
                if error is not None:
                    yield batch.bad_shard(error, draw)
                    continue
                order = self.window_order(worker, draw, index, len(window))
                ahead = -(-self.window // max(1, len(window) - first))  # reads per sample handed out
                try:
                    for t in range(first, len(window)):
                        reader.read(ahead)
                        done = batch.add(window[order[t]], draw, index * self.window + t)
                        if done is not None:
                            yield done
                except ShardReadError as e:  # SampleError: a sample without the configured members
                    reader.abandon(draw)
                    yield batch.bad_shard(e, draw)
        finally:
            reader.close()

    def shard_index(self, worker: int, draw: int) -> int:
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, self.rank, worker, draw, _DRAW)))
        return int(rng.integers(len(self.urls)))

    def window_order(self, worker: int, draw: int, index: int, size: int) -> Sequence[int]:
        """The order window `index` of `draw` hands its samples out in (its permutation)."""
        if self.window == 1:
            return range(size)
        return np.random.Generator(
            np.random.PCG64(derive_seed(self.seed, self.rank, worker, draw, _WINDOW, index))).permutation(size)


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
                            worker_init_fn=cpu_loader_worker_init(workers), collate_fn=as_is,
                            generator=torch.Generator().manual_seed(self.seed))
        received = iter(loader)  # in this thread: torch installs its dead-worker handler from the main thread only
        items: Iterator[dict] = (self._normalized(item) for item in received)
        if workers and not loader.pin_memory:  # CUDA: torch's pin-memory thread already receives
            items = received_in_background(items, depth=2)  # receives and normalises off the step
        for item in items:
            worker = item.pop("_worker")
            self.positions[worker] = tuple(item.pop("_pos"))
            self.next_worker = (worker + 1) % self.num_streams
            if "_bad_shard" in item:
                self._count_bad_shard(item)
                continue
            images, labels = self.mixer(item["image"], torch.from_numpy(item["label"]),
                                        derive_seed(self.seed, self.rank, self.batches, _MIX))
            self.batches += 1
            yield {"image": images, "label": labels, "key": item["key"]}

    def _normalized(self, item: dict) -> dict:
        if "_bad_shard" not in item:
            item["image"] = self.normalize(torch.as_tensor(item["image"]))
        return item

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
