"""The training loop, one for pre-training and fine-tuning (big_vision's shape, DeepSpeed's engine).

    __init__: process group -> resume located -> model (fresh or the fine-tune source) -> DeepSpeed
              -> tracker started -> checkpoint loaded -> data stream positioned
    fit():    loop (engine/loop.py) -> checkpoint -> export -> eval -> register -> figures

Everything is built in ``__init__`` (torchtitan's rule): ``fit()`` only runs. The Trainer takes the
typed ``JobConfig`` (vitscale.config), local paths (``Start``: the entry point resolved MLflow URIs)
and the Tracker it is given; it never imports MLflow or a CLI module.

Callbacks let the Ray sweep (launch/sweep.py) report metrics and checkpoints without touching the
loop: any object with some of ``on_log(metrics, step)``, ``on_eval(metrics, step)``,
``on_checkpoint(step, ckpt_dir, metrics)``; they run on every rank.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from pathlib import Path
from collections.abc import Generator
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import yaml

from vitscale.config import JobConfig, Start
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.activation import apply_policy
from vitscale.engine.compile import apply_compile, check_compile
from vitscale.engine.build import build_loss, build_model
from vitscale.engine.deepspeed_config import build as build_ds_config
from vitscale.engine.deepspeed_config import loop_clips_gradients, offloads_optimizer, resolve_precision
from vitscale.engine.grad_reduce import OverlappedGradReduce
from vitscale.engine.distributed import DistInfo, destroy_group, init_distributed, teardown
from vitscale.engine.loop import TrainingDiverged, run_loop
from vitscale.engine.metrics import MetricsWriter, StepTimer, peak_flops, peak_memory_bytes, progress_line
from vitscale.engine.optim import build_optimizer
from vitscale.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(job, start=..., tracker=...).fit() -> dict`` of final metrics.

    ``batches``: an iterable of ``{"image", "label"}`` batches instead of the configured shard stream
    (the benchmarks feed synthetic batches); its position is not checkpointed.
    """

    def __init__(self, job: JobConfig, *, start: Start | None = None, tracker: Tracker | None = None,
                 callbacks: Iterable[Any] = (), run_params: Mapping[str, Any] | None = None,
                 batches: Iterable[dict[str, Any]] | None = None) -> None:
        self.job = job
        self.start = start if start is not None else local_start(job)
        self.callbacks = list(callbacks)
        self.output_dir = job.output_dir
        self.tracker: Tracker = tracker if tracker is not None else NullTracker()
        self.loader: Any = None  # the shard stream (its state is checkpointed), None with injected batches
        self.batches: Iterator[dict[str, Any]] = iter(())
        self.dist: DistInfo = init_distributed(timeout_s=job.trainer.dist_timeout_s)
        if not self.dist.is_main:  # one console: other ranks speak only for warnings and errors
            logging.getLogger("vitscale").setLevel(logging.WARNING)
        try:
            self._build(run_params or {}, batches)
        except BaseException:
            self._close(clean=False)
            raise

    def _build(self, run_params: Mapping[str, Any], batches: Iterable[dict[str, Any]] | None) -> None:
        import deepspeed

        job, info = self.job, self.dist
        if job.eval is not None and job.data.val_shards:
            # A validation list the final evaluation cannot use fails now, not after the last step.
            from vitscale.data import check_val_shards

            check_val_shards(job.data, world_size=info.world_size, num_workers=job.data.num_workers)
        # Located before DeepSpeed exists: its config must say whether to load a universal checkpoint.
        self.resume_ref = ckpt.resolve(self.start.resume, self.output_dir, what=f"resume={job.resume}")
        self.resume_world = ckpt.written_world_size(self.resume_ref) if self.resume_ref else None
        self.resume_universal = (self.resume_ref is not None and self.resume_world != info.world_size
                                 and ckpt.needs_universal(self.resume_ref))
        if self.resume_ref is not None:
            self._check_resume_config(self.resume_ref)

        seed_everything(job.seed)  # the same model init on every rank (ZeRO-3 == ZeRO-0)
        model = build_model(job.model, source=self.start.source, finetune=job.finetune)
        self.model_config = dict(model.config)
        tc = job.trainer
        self.precision = resolve_precision(tc.precision, info.device)
        self.ds_config = build_ds_config(job, info.world_size, precision=self.precision, device=info.device,
                                         load_universal=self.resume_universal)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self.loop_clips = loop_clips_gradients(self.zero_stage, self.precision)
        self.grad_clip = float(job.optim.grad_clip or 0.0)
        check_compile(tc.compile, tc.compile_backend)
        apply_policy(model, tc.activation_checkpointing.policy, tc.activation_checkpointing.every, self.ds_config)
        apply_compile(model, tc.compile, tc.compile_backend, eager_rng=tc.compile_eager_rng)
        from vitscale.models import macs_per_image

        self.flops_per_image = 2.0 * macs_per_image(model)  # a multiply-accumulate is 2 FLOPs
        self.tokens_per_image = int(math.prod(model.grid_size)) + int(model.num_prefix_tokens)
        model.to(info.device)  # before the optimizer: fused CUDA AdamW checks its parameters' device
        self.optimizer = build_optimizer(model, job.optim, device=info.device, offload=offloads_optimizer(job))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        self.grad_reduce: OverlappedGradReduce | None = None
        if self.loop_clips and info.world_size > 1 and tc.overlap_grad_reduce:
            self.engine.enable_backward_allreduce = False  # DeepSpeed's flag for "someone else reduces"
            self.grad_reduce = OverlappedGradReduce(self.engine.module)
        self.loss_fn = build_loss(tc.loss)
        self.peak = float(tc.peak_flops) if tc.peak_flops else peak_flops(info.device, self.precision)
        self.metrics_file = MetricsWriter(self.output_dir / "metrics.jsonl", enabled=info.is_main)
        self.tracker.start(job.record, self.ds_config, tags={"launcher": info.launcher, **self.start.lineage})
        if run_params:  # the entry point's vitscale.plan prediction, checked against measured/* at the end
            self.tracker.log_params(dict(run_params))
        # Different dropout / drop-path masks per rank from here on, reproducible per (seed, rank).
        seed_everything(job.seed * 1000 + info.rank)

        self.step = 0
        self.nan_skips = 0
        self.warned_unshared = False  # tracking.log_checkpoints without shared storage: said once
        data_state, self.resume_rng = self._resume()
        if batches is None:
            from vitscale.data import build_train_loader

            self.loader = build_train_loader(
                job.data, batch_size=tc.micro_batch_size, rank=info.rank, world_size=info.world_size,
                seed=job.seed, img_size=job.model.img_size, in_chans=job.model.in_chans)
            if data_state is not None:  # elastic: another world size / workers / micro-batch is remapped, logged
                self.loader.load_state_dict(data_state, elastic=True)
            batches = self.loader
        self.batches = iter(batches)
        self.sample_images: torch.Tensor | None = None  # the first batch's, for the attention-distance figure

    # ------------------------------------------------------------------ public
    def fit(self) -> dict[str, Any]:
        clean = False
        try:
            # Starting the loader draws its DataLoader base seed from torch's global RNG, once, at the
            # first batch: start it, then restore the checkpoint's RNG, so a resumed run's dropout
            # stream continues exactly where the interrupted one stopped.
            first = next(self.batches)
            self.sample_images = first["image"][:16].detach().cpu()
            if self.resume_rng is not None:
                ckpt.set_rng_state(self.resume_rng)
            result = run_loop(self, itertools.chain([first], self.batches))
            if self.dist.is_main:  # measured, beside the plan's plan/peak_gb and plan/mfu_assumed
                self.tracker.log_metrics({"measured/peak_mem_gb": self.memory_bytes() / 2**30,
                                          "measured/mfu": float(result.get("mfu", 0.0))}, self.step)
            clean = True
            return result
        except TrainingDiverged:
            clean = True  # every rank agreed to stop: still tear down in step
            raise
        finally:
            self._close(clean)

    # ------------------------------------------------------------------ resume
    def _check_resume_config(self, ref: ckpt.CheckpointRef) -> None:
        """resume=auto refuses a checkpoint whose stored config differs outside ckpt.MAY_CHANGE (one
        line naming the keys and the two ways out); an explicit resume=PATH / runs:/ID warns."""
        from vitscale.engine.checkpoint.locate import from_rank0

        saved = from_rank0(lambda: ckpt.read_saved(ref.path))
        what = f"resume={self.job.resume}"
        if saved is None:
            if self.dist.is_main:
                log.warning("%s: %s has no %s (written before vitscale stored configs): config not compared",
                            what, ref.path, ckpt.CONFIG_FILE)
            return
        current = self.job.record
        keys = ckpt.differing_keys(saved, current)
        if not keys:
            return
        if self.job.resume == "auto":
            raise ckpt.ResumeConfigError(ckpt.mismatch_line(what, ref.path, keys, saved, current, self.output_dir))
        if self.dist.is_main:
            from vitscale.engine.checkpoint.run_config import describe

            log.warning("%s: checkpoint %s was written with a different config: %s; continuing, as the checkpoint "
                        "was named explicitly", what, ref.path, describe(keys, saved, current))

    def _resume(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Load the located checkpoint -> (data-stream state, RNG state); (None, None): fresh.

        On another world size (docs/training.md "Resuming on a different world size"): ZeRO 1-3 load
        DeepSpeed's universal conversion (cached in <tag>/universal/), the global batch stays the
        configured one (accumulation re-derived), the data stream is remapped (docs/data.md) and every
        rank's RNG streams restart from (seed, step, rank): old ranks' streams have no new owner."""
        ref, info = self.resume_ref, self.dist
        if ref is None:
            return None, None
        elastic = self.resume_world is not None and self.resume_world != info.world_size
        universal = None
        if elastic:
            how = "ZeRO-0: DeepSpeed's single model/optimizer file loads on any world size"
            if self.resume_universal:
                universal, how = ckpt.universal_ref(ref, optimizer=self.optimizer)
            if info.is_main:
                log.warning("world size changed: %s was written by %d ranks, this job has %d; %s; global batch %d "
                            "kept (micro-batch %d x %d ranks x %d accumulation); data stream remapped and RNG "
                            "streams re-derived from (seed, step, rank)", ref.path, self.resume_world,
                            info.world_size, how, self.job.trainer.global_batch_size,
                            self.job.trainer.micro_batch_size, info.world_size, self.accumulation)
        client, rank_state = ckpt.load(self.engine, ref, rank=info.rank, written_world=self.resume_world,
                                       universal=universal)
        self.step = int(client["step"])
        self.nan_skips = int(client.get("nan_skips", 0))
        log.info("resumed from %s at step %d", ref.path, self.step)
        rng = rank_state["rng"]
        if elastic:
            seed_everything(ckpt.derived_seed(self.job.seed, self.step, info.rank))
            rng = ckpt.rng_state()
        return rank_state.get("data"), rng

    # ------------------------------------------------------------------ loop
    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> ckpt.CheckpointRef:
        ref = ckpt.save(
            self.engine, self.output_dir / "checkpoints", self.step, rank=self.dist.rank,
            client_state={"step": self.step, "nan_skips": self.nan_skips, **ckpt.universal_info()},
            rank_state={"rng": ckpt.rng_state(), "data": self.loader.state_dict() if self.loader else None},
            keep=self.job.trainer.keep_checkpoints, train_config=self.record_yaml())
        if self.job.tracking.log_checkpoints and self.dist.is_main:
            self._upload_checkpoint(ref)
        self.emit("on_checkpoint", self.step, str(ref.path), dict(metrics or {}))
        return ref

    def _upload_checkpoint(self, ref: ckpt.CheckpointRef) -> None:
        """Rank 0, after ckpt.save's barriers: attach the tag directory to the run so that
        ``resume=runs:/ID`` works where output_dir is not reachable. Only when rank 0 sees every
        rank's files (shared storage); a node-local checkpoint would be uploaded incomplete."""
        missing = [r for r in range(self.dist.world_size) if not (ref.path / f"rank_{r}.pt").is_file()]
        if missing:
            if not self.warned_unshared:
                self.warned_unshared = True
                log.warning("tracking.log_checkpoints: %s lacks rank files %s (checkpoint dir not on "
                            "shared storage?); not uploading checkpoints", ref.path, missing[:4])
            return
        self.tracker.log_checkpoint(ref.root, ref.tag)
        # Send now: the next save may prune this tag before a deferred upload reads it.
        self.tracker.flush()

    def export(self, ref: ckpt.CheckpointRef) -> Path | None:
        """Rank 0 consolidates ``ref`` to output_dir/export/<tag>; the others wait."""
        out = self.output_dir / "export" / ref.tag
        if self.dist.is_main:
            state = ckpt.consolidated_state_dict(ref, zero_stage=self.zero_stage, module=self.engine.module)
            ckpt.export(state, out, model_config=self.model_config,
                        train_config_yaml=self.record_yaml())
        dist.barrier()
        return out

    def finish_export(self, out: Path, metrics: dict[str, Any]) -> None:
        """Rank 0: attach the export to the run and register it when tracking.register_name is set."""
        if not self.dist.is_main:
            return
        tc = self.job.tracking
        if tc.register_name:  # register_export logs the directory to the run itself
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.tracker.register(out, tc.register_name, step=self.step, metrics=numeric,
                                  best_metric=tc.best_metric, mode=tc.best_mode)
        else:
            self.tracker.log_artifact(out, f"export/{out.name}")

    def log_figures(self, out: Path) -> None:
        """Rank 0: training curves and the paper's Figure 7 panels, drawn from the consolidated export
        (so ZeRO-3's partitioned parameters need no gathering). A failure costs a warning, not the run."""
        if not self.dist.is_main or not self.job.tracking.figures:
            return
        from vitscale.eval.figures import log_export_figures

        try:
            names = log_export_figures(self.tracker, out, images=self.sample_images,
                                       metrics_path=self.output_dir / "metrics.jsonl")
            log.info("figures logged: %s", ", ".join(names))
        except Exception as exc:  # noqa: BLE001 - figures are a report, never a reason to fail a finished run
            log.warning("figures not drawn (%s: %s)", type(exc).__name__, exc)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(*args)

    def log_record(self, record: dict[str, Any]) -> None:
        """One logged record, from training or evaluation: metrics.jsonl, the tracker (rank 0) and
        the callbacks (every rank; ``on_eval`` for records of ``eval/*`` metrics, else ``on_log``)."""
        step = record["step"]
        metrics = {k: v for k, v in record.items() if k != "step"}
        if self.dist.is_main:
            if "loss" in record:
                log.info("%s", progress_line(record, self.job.trainer.max_steps))
            self.metrics_file.write(record)
            self.tracker.log_metrics(metrics, step)
        if all(k.startswith("eval/") for k in metrics):
            self.emit("on_eval", metrics, step)
        else:
            self.emit("on_log", record, step)

    def record_yaml(self) -> str:
        """The resolved config a checkpoint and an export store (resume=auto compares it)."""
        return yaml.safe_dump(self.job.record, sort_keys=False)

    def memory_bytes(self) -> int:
        return peak_memory_bytes(self.dist.device)

    def throughput(self, timer: StepTimer) -> dict[str, float]:
        """The window's images/s, tokens/s, MFU and time split (read at a log step only)."""
        return timer.summary(world_size=self.dist.world_size, tokens_per_image=self.tokens_per_image,
                             flops_per_image=self.flops_per_image, peak=self.peak)

    # ------------------------------------------------------------------ teardown
    def _close(self, clean: bool) -> None:
        """Stop loader workers and the tracker, then the process group: nothing may outlive fit()."""
        if isinstance(self.batches, Generator):
            self.batches.close()  # the shard stream's generator: closing it stops its DataLoader workers
        self.tracker.end("FINISHED" if clean else "FAILED")
        self.tracker = NullTracker()  # a second _close (or a late callback) logs nowhere
        if clean:
            teardown(self.dist)
        elif self.dist.owns_group and dist.is_initialized():
            destroy_group()  # no barrier: a peer may be gone


def local_start(job: JobConfig) -> Start:
    """The Start of a job whose resume and fine-tune source are local already (tests, benchmarks);
    MLflow URIs are the entry point's to resolve (vitscale.start.resolve_start)."""
    for key, value in (("resume", job.resume), ("finetune.source", job.finetune.source)):
        if value and ":/" in str(value):
            raise ValueError(f"{key}={value}: resolve it with vitscale.start.resolve_start before the Trainer")
    return Start(resume=job.resume, source=Path(job.finetune.source) if job.finetune.source else None)
