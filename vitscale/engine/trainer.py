"""The training loop, one for pre-training and fine-tuning (big_vision's shape, DeepSpeed's engine).

    data -> init (model, optional fine-tune source, DeepSpeed) -> resume -> loop -> eval -> export

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
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from vitscale.config import validate
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.activation import apply_policy
from vitscale.engine.compile import apply_compile, check_compile
from vitscale.engine.build import build_loss, load_model
from vitscale.engine.deepspeed_config import build as build_ds_config
from vitscale.engine.deepspeed_config import loop_clips_gradients, offloads_optimizer, resolve_precision
from vitscale.engine.distributed import DistInfo, init_distributed, teardown
from vitscale.engine.loop import TrainingDiverged, run_loop
from vitscale.engine.metrics import MetricsWriter, StepTimer, peak_flops, peak_memory_bytes, progress_line
from vitscale.engine.optim import build_optimizer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(cfg, callbacks=[...]).fit() -> dict`` of final metrics."""

    def __init__(self, cfg: DictConfig, callbacks: Iterable[Any] = (),
                 run_params: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        # Logged as run params beside the config (the entry point passes vitscale.plan's prediction,
        # so every run's measured peak memory and MFU can be checked against it).
        self.run_params = dict(run_params or {})
        self.output_dir = Path(cfg.output_dir)
        self.dist: DistInfo | None = None
        self.tracker: Any = None
        self.loader: Any = None
        self.step = 0
        self.nan_skips = 0
        self.resume_ref: ckpt.CheckpointRef | None = None  # set by _locate_resume, before setup
        self.resume_world: int | None = None  # ranks that wrote resume_ref
        self.resume_universal = False  # resume_ref needs DeepSpeed's universal checkpoint (world size changed)

    # ------------------------------------------------------------------ public
    def fit(self) -> dict[str, Any]:
        validate(self.cfg)  # the entry points did it already; a Trainer built by other code gets it too
        self.dist = init_distributed(timeout_s=float(self.cfg.trainer.get("dist_timeout_s", 1800)))
        if not self.dist.is_main:  # one console: other ranks speak only for warnings and errors
            logging.getLogger("vitscale").setLevel(logging.WARNING)
        clean = False
        try:
            result = self._fit()
            clean = True
            return result
        except TrainingDiverged:
            clean = True  # every rank agreed to stop: still tear down in step
            raise
        finally:
            self._close(clean)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Model, DeepSpeed engine, loss, metrics and tracker (no data): the benchmark reuses it."""
        import deepspeed

        cfg, info = self.cfg, self.dist
        assert info is not None
        seed_everything(int(cfg.seed))  # the same model init on every rank (ZeRO-3 == ZeRO-0)
        model, self.source_lineage = load_model(cfg)
        self.model_config = dict(model.config)
        tc = cfg.trainer
        self.precision = resolve_precision(str(tc.precision), info.device)
        self.ds_config = build_ds_config(cfg, info.world_size, precision=self.precision, device=info.device,
                                         load_universal=self.resume_universal)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self.loop_clips = loop_clips_gradients(self.zero_stage, self.precision)
        self.grad_clip = float(cfg.optim.grad_clip or 0.0)
        ac = tc.activation_checkpointing
        compile_mode, backend = str(tc.get("compile") or "none"), str(tc.get("compile_backend") or "inductor")
        check_compile(compile_mode, backend)
        apply_policy(model, str(ac.policy), int(ac.every), self.ds_config)
        apply_compile(model, compile_mode, backend, eager_rng=bool(tc.get("compile_eager_rng", False)))
        from vitscale.models import flops_per_image

        self.flops_per_image = 2.0 * flops_per_image(model)  # MACs -> FLOPs
        self.tokens_per_image = int(math.prod(model.grid_size)) + int(model.num_prefix_tokens)
        model.to(info.device)  # before the optimizer: fused CUDA AdamW checks its parameters' device
        self.optimizer = build_optimizer(model, cfg.optim, device=info.device, offload=offloads_optimizer(cfg))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        self.loss_fn = build_loss(str(tc.loss))
        self.peak = float(tc.peak_flops) if tc.get("peak_flops") else peak_flops(info.device, self.precision)
        self.metrics_file = MetricsWriter(self.output_dir / "metrics.jsonl", enabled=info.is_main)
        self.tracker = self._make_tracker()
        # Different dropout / drop-path masks per rank from here on, reproducible per (seed, rank).
        seed_everything(int(cfg.seed) * 1000 + info.rank)

    def _make_tracker(self) -> Any:
        assert self.dist is not None
        if not self.cfg.tracking.enabled:
            from vitscale.tracking import NullTracker

            return NullTracker()
        from vitscale.tracking import make_tracker

        container = OmegaConf.to_container(self.cfg, resolve=True)
        assert isinstance(container, dict)
        tracker = make_tracker(container, self.dist.rank)
        tracker.start(container, self.ds_config, tags={"launcher": self.dist.launcher, **self.source_lineage})
        if self.run_params:
            tracker.log_params(self.run_params)
        return tracker

    def _build_loader(self, data_state: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        from vitscale.data import build_train_loader

        cfg, info = self.cfg, self.dist
        assert info is not None
        self.loader = build_train_loader(
            cfg.data, batch_size=int(cfg.trainer.micro_batch_size), rank=info.rank,
            world_size=info.world_size, seed=int(cfg.seed), img_size=cfg.model.img_size,
            in_chans=int(cfg.model.in_chans))
        if data_state is not None:  # elastic: another world size / workers / micro-batch is remapped, logged
            self.loader.load_state_dict(data_state, elastic=True)
        return iter(self.loader)

    def _locate_resume(self) -> None:
        """Before setup (collective): the checkpoint ``resume`` names, its config checked against this
        run's, and whether its world size differs (DeepSpeed reads ``checkpoint.load_universal`` from
        the config it is initialised with, so this must be known before ``deepspeed.initialize``)."""
        assert self.dist is not None
        ref = ckpt.resolve(self.cfg.resume, self.output_dir, tracking_uri=self.cfg.tracking.get("uri"))
        self.resume_ref = ref
        if ref is None:
            return
        self._check_resume_config(ref)
        self.resume_world = ckpt.written_world_size(ref)
        self.resume_universal = self.resume_world != self.dist.world_size and ckpt.needs_universal(ref)

    def _check_resume_config(self, ref: ckpt.CheckpointRef) -> None:
        """resume=auto refuses a checkpoint whose stored config differs outside ckpt.MAY_CHANGE (one
        line naming the keys and the two ways out); an explicit resume=PATH / runs:/ID warns."""
        from vitscale.engine.checkpoint.locate import from_rank0

        assert self.dist is not None
        saved = from_rank0(lambda: ckpt.read_saved(ref.path))
        what = f"resume={self.cfg.resume}"
        if saved is None:
            if self.dist.is_main:
                log.warning("%s: %s has no %s (written before vitscale stored configs): config not compared",
                            what, ref.path, ckpt.CONFIG_FILE)
            return
        current = OmegaConf.to_container(self.cfg, resolve=True)
        assert isinstance(current, dict)
        keys = ckpt.differing_keys(saved, current)
        if not keys:
            return
        if self.cfg.resume == "auto":
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
        assert self.dist is not None
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
                            info.world_size, how, int(self.cfg.trainer.global_batch_size),
                            int(self.cfg.trainer.micro_batch_size), info.world_size, self.accumulation)
        client, rank_state = ckpt.load(self.engine, ref, rank=info.rank, written_world=self.resume_world,
                                       universal=universal)
        self.step = int(client["step"])
        self.nan_skips = int(client.get("nan_skips", 0))
        log.info("resumed from %s at step %d", ref.path, self.step)
        rng = rank_state["rng"]
        if elastic:
            seed_everything(ckpt.derived_seed(int(self.cfg.seed), self.step, info.rank))
            rng = ckpt.rng_state()
        return rank_state.get("data"), rng

    # ------------------------------------------------------------------ loop
    def _fit(self) -> dict[str, Any]:
        if self.cfg.get("eval") is not None and self.cfg.data.get("val_shards"):
            # A validation list the final evaluation cannot use fails now, not after the last step.
            from vitscale.data import check_val_shards

            check_val_shards(self.cfg.data, world_size=self.dist.world_size,
                             num_workers=int(self.cfg.data.num_workers))
        self._locate_resume()
        self.setup()
        data_state, rng = self._resume()
        batches = self._build_loader(data_state)
        # Starting the loader draws its DataLoader base seed from torch's global RNG, once, at the
        # first batch: start it, then restore the checkpoint's RNG, so a resumed run's dropout
        # stream continues exactly where the interrupted one stopped.
        first = next(batches)
        self.sample_images = first["image"][:16].detach().cpu()  # for the attention-distance figure
        if rng is not None:
            ckpt.set_rng_state(rng)
        result = run_loop(self, itertools.chain([first], batches))
        if self.dist.is_main:  # measured, beside the plan's plan/peak_gb and plan/mfu_assumed
            self.tracker.log_metrics({"measured/peak_mem_gb": self.memory_bytes() / 2**30,
                                      "measured/mfu": float(result.get("mfu", 0.0))}, self.step)
        return result

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> ckpt.CheckpointRef:
        assert self.dist is not None
        ref = ckpt.save(
            self.engine, self.output_dir / "checkpoints", self.step, rank=self.dist.rank,
            client_state={"step": self.step, "nan_skips": self.nan_skips, **ckpt.universal_info()},
            rank_state={"rng": ckpt.rng_state(), "data": self.loader.state_dict()},
            keep=int(self.cfg.trainer.keep_checkpoints),
            train_config=OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.cfg.tracking.get("log_checkpoints") and self.dist.is_main:
            self._upload_checkpoint(ref)
        self.emit("on_checkpoint", self.step, str(ref.path), dict(metrics or {}))
        return ref

    def _upload_checkpoint(self, ref: ckpt.CheckpointRef) -> None:
        """Rank 0, after ckpt.save's barriers: attach the tag directory to the run so that
        ``resume=runs:/ID`` works where output_dir is not reachable. Only when rank 0 sees every
        rank's files (shared storage); a node-local checkpoint would be uploaded incomplete."""
        assert self.dist is not None
        missing = [r for r in range(self.dist.world_size) if not (ref.path / f"rank_{r}.pt").is_file()]
        if missing:
            if not getattr(self, "_warned_unshared", False):
                self._warned_unshared = True
                log.warning("tracking.log_checkpoints: %s lacks rank files %s (checkpoint dir not on "
                            "shared storage?); not uploading checkpoints", ref.path, missing[:4])
            return
        self.tracker.log_checkpoint(ref.root, ref.tag)
        # Send now: the next save may prune this tag before a deferred upload reads it.
        self.tracker.flush()

    def export(self, ref: ckpt.CheckpointRef) -> Path | None:
        """Rank 0 consolidates ``ref`` to output_dir/export/<tag>; the others wait."""
        assert self.dist is not None
        out = self.output_dir / "export" / ref.tag
        if self.dist.is_main:
            state = ckpt.consolidated_state_dict(ref, zero_stage=self.zero_stage, module=self.engine.module)
            ckpt.export(state, out, model_config=self.model_config,
                        train_config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True))
        dist.barrier()
        return out

    def finish_export(self, out: Path, metrics: dict[str, Any]) -> None:
        """Rank 0: attach the export to the run and register it when tracking.register_name is set."""
        assert self.dist is not None
        if not self.dist.is_main:
            return
        name = self.cfg.tracking.get("register_name")
        if name:  # register_export logs the directory to the run itself
            tc = self.cfg.tracking
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.tracker.register(out, str(name), step=self.step, metrics=numeric,
                                  best_metric=tc.get("best_metric"), mode=str(tc.get("best_mode", "max")))
        else:
            self.tracker.log_artifact(out, f"export/{out.name}")

    def log_figures(self, out: Path) -> None:
        """Rank 0: training curves and the paper's Figure 7 panels, drawn from the consolidated export
        (so ZeRO-3's partitioned parameters need no gathering). A failure costs a warning, not the run."""
        assert self.dist is not None
        if not self.dist.is_main or not self.cfg.tracking.get("figures", True):
            return
        from vitscale.eval.figures import log_export_figures

        try:
            names = log_export_figures(self.tracker, out, images=getattr(self, "sample_images", None),
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
        """One logged step: metrics.jsonl, the tracker (rank 0) and the callbacks (every rank)."""
        assert self.dist is not None
        if self.dist.is_main:
            if "loss" in record:
                log.info("%s", progress_line(record, int(self.cfg.trainer.max_steps)))
            self.metrics_file.write(record)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
        self.emit("on_log", record, record["step"])

    def memory_bytes(self) -> int:
        assert self.dist is not None
        return peak_memory_bytes(self.dist.device)

    def throughput(self, timer: StepTimer) -> dict[str, float]:
        """The window's images/s, tokens/s, MFU and time split (read at a log step only)."""
        assert self.dist is not None
        return timer.summary(world_size=self.dist.world_size, tokens_per_image=self.tokens_per_image,
                             flops_per_image=self.flops_per_image, peak=self.peak)

    # ------------------------------------------------------------------ teardown
    def _close(self, clean: bool) -> None:
        """Stop loader workers and the tracker, then the process group: nothing may outlive fit()."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()
        self.loader = None
        if self.tracker is not None:
            self.tracker.end("FINISHED" if clean else "FAILED")
            self.tracker = None
        if clean:
            teardown(self.dist)
        elif self.dist is not None and self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: a peer may be gone
