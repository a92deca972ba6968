"""Checkpoints: DeepSpeed's own save/load (all ZeRO stages) plus what exact, safe resume needs beyond it.

Layout (docs/ARCHITECTURE.md): ``output_dir/checkpoints/<tag>/`` as DeepSpeed writes it, plus
``rank_<r>.pt`` per rank (DeepSpeed keeps ``client_state`` from rank 0 only, so per-rank RNG streams
and the data stream position go beside it) and ``manifest.json`` (sha256 of every rank's files,
written by rank 0 after every rank finished: manifest.py defines *complete* and *intact*), and the
``latest`` file, moved only after the manifest. ``resume=auto`` takes the newest intact checkpoint
whatever ``latest`` says (locate.py). Nothing is unpickled with ``weights_only=False``, DeepSpeed's
loaders included (safe_load.py). A save never overwrites a directory it did not write (store.py).

Export: ZeRO partitions (stages 1-3) are merged by DeepSpeed's ``zero_to_fp32`` into one fp32
state dict, saved as safetensors with ``model_config.json`` so ``create_model(**config)`` +
``load_state_dict`` (or timm through ``vitscale.models.convert.to_timm``) can load it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscale.engine.checkpoint.errors import (
    CheckpointError, CorruptCheckpointError, NoSpaceError, UnsafeCheckpointError,
)
from vitscale.engine.checkpoint.layout import TAG_PREFIX, step_of, tag_for, tags
from vitscale.engine.checkpoint.locate import CheckpointRef, latest, newest_intact, resolve, verify
from vitscale.engine.checkpoint.elastic import (
    UNIVERSAL, derived_seed, needs_universal, universal_info, universal_ref, written_world_size,
)
from vitscale.engine.checkpoint.manifest import MANIFEST, Problem
from vitscale.engine.checkpoint.run_config import (
    CONFIG_FILE, MAY_CHANGE, ResumeConfigError, differing_keys, mismatch_line, read_saved,
)
from vitscale.engine.checkpoint.safe_load import ALLOWED_GLOBALS, safe_load, weights_only_loads
from vitscale.engine.checkpoint.store import REPLACED_DIR, describe_write_error, load, prune, save

__all__ = [
    "ALLOWED_GLOBALS", "CONFIG_FILE", "MANIFEST", "MAY_CHANGE", "UNIVERSAL", "ResumeConfigError",
    "derived_seed", "differing_keys", "mismatch_line", "needs_universal", "read_saved", "universal_info", "universal_ref",
    "written_world_size", "REPLACED_DIR", "TAG_PREFIX", "CheckpointError", "CheckpointRef",
    "CorruptCheckpointError", "NoSpaceError", "Problem", "UnsafeCheckpointError", "consolidated_state_dict",
    "describe_write_error", "export", "latest", "load", "load_export", "newest_intact", "prune", "resolve",
    "rng_state", "safe_load", "save", "set_rng_state", "step_of", "tag_for", "tags", "verify", "weights_only_loads",
]
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- export
def consolidated_state_dict(ref: CheckpointRef, *, zero_stage: int, module: torch.nn.Module,
                            progress_every_s: float = PROGRESS_EVERY_S) -> dict[str, torch.Tensor]:
    """One fp32 state dict: DeepSpeed's zero_to_fp32 for ZeRO 1-3 (weights-only unpickling); stage 0
    holds full weights already.

    Logs a line at start (tag, stage, rank files) and at end (parameters, bytes, seconds), and DeepSpeed's
    own per-file / per-tensor progress every ``progress_every_s`` seconds (0: every item) in place of its
    tqdm bars; its ``print`` chatter goes to DEBUG (``VITSCALE_VERBOSE=1`` leaves both as DeepSpeed prints them).
    """
    start = time.monotonic()
    if zero_stage == 0:
        log.info("export: %s from the engine's full weights (ZeRO-0, nothing to consolidate)", ref.tag)
        state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    else:
        from deepspeed.utils import zero_to_fp32

        from vitscale.console import verbose

        files = sorted(ref.path.glob("*optim_states.pt"))
        log.info("export: consolidating %s from %s (ZeRO-%d, %d rank files) with DeepSpeed's zero_to_fp32",
                 ref.tag, ref.root, zero_stage, len(files))
        with contextlib.ExitStack() as stack:
            stack.enter_context(weights_only_loads())
            chatter = io.StringIO()
            if not verbose():
                stack.enter_context(_progress_instead_of_tqdm(zero_to_fp32, progress_every_s))
                stack.enter_context(contextlib.redirect_stdout(chatter))
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
        for line in chatter.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", line)
    numel = sum(v.numel() for v in state.values())
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    log.info("export: %s parameters in %d tensors (%.1f MB fp32) consolidated in %.1f s",
             f"{numel:,}", len(state), nbytes / 1e6, time.monotonic() - start)
    return state


@contextlib.contextmanager
def _progress_instead_of_tqdm(module: Any, every_s: float) -> Iterator[None]:
    """zero_to_fp32 wraps its loops (rank files loaded, ZeRO-3 tensors gathered) in ``tqdm``: a log line
    every ``every_s`` seconds instead of a progress bar on every console."""
    def progress(iterable: Iterable[Any], desc: str = "", *args: Any, **kwargs: Any) -> Iterator[Any]:
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        start = last = time.monotonic()
        what = (desc or "items").lower()
        for i, item in enumerate(iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                log.info("export: %s %d/%s (%.0f s)", what, i, total if total is not None else "?", now - start)

    if not hasattr(module, "tqdm"):
        yield
        return
    original = module.tqdm
    module.tqdm = progress
    try:
        yield
    finally:
        module.tqdm = original


def export(state_dict: dict[str, torch.Tensor], out_dir: Path, *, model_config: dict[str, Any],
           train_config_yaml: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` (+ ``train_config.yaml``) into out_dir."""
    from safetensors.torch import save_file

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (zero_to_fp32 may hand out views): own each one.
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (out_dir / "model_config.json").write_text(json.dumps(_jsonable(model_config), indent=2, sort_keys=True))
    if train_config_yaml is not None:
        (out_dir / "train_config.yaml").write_text(train_config_yaml)
    log.info("export: wrote %s (%s parameters, %.1f MB) in %.1f s", weights,
             f"{sum(t.numel() for t in tensors.values()):,}", weights.stat().st_size / 1e6, time.monotonic() - start)
    return out_dir


def load_export(export_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, model config) of an export directory, with one clear error when incomplete."""
    from safetensors.torch import load_file

    weights, config = export_dir / "model.safetensors", export_dir / "model_config.json"
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: expected an export with model.safetensors + model_config.json")
    return load_file(str(weights)), json.loads(config.read_text())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
