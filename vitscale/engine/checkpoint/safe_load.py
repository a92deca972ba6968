"""Unpickling without code execution: every torch.load vitscale does (its own, DeepSpeed's checkpoint
engine, DeepSpeed's zero_to_fp32) runs with ``weights_only=True`` and an explicit allow-list.

A ``.pt`` file is a pickle: loaded with ``weights_only=False`` (DeepSpeed's default) it can run any code
its author chose, and ``resume=runs:/ID`` downloads such files from an artifact store. torch's
weights-only unpickler accepts tensors and plain containers only, plus the classes passed to
``torch.serialization.safe_globals``. DeepSpeed 0.19 checkpoints (ZeRO 0-3, fp32/bf16, measured with
``torch.serialization.get_unsafe_globals_in_checkpoint``) need exactly three more, listed in
``ALLOWED_GLOBALS``; ``DynamicLossScaler`` is fp16's (CUDA) variant of ``LossScaler``. Anything
else is refused with one line naming the file and the global; nothing of the file runs.

DeepSpeed hard-codes ``weights_only=False`` in ``TorchCheckpointEngine.load`` and in zero_to_fp32, and
it looks ``torch.load`` up at call time, so ``weights_only_loads()`` swaps ``torch.load`` for the
guarded one around those calls (one context covers both, and any path DeepSpeed adds later).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from collections.abc import Iterator
from typing import IO, Any

import torch

from vitscale.engine.checkpoint.errors import CheckpointError, UnsafeCheckpointError, one_line

# module path -> class names: every non-torch, non-builtin global a DeepSpeed 0.19 checkpoint holds.
ALLOWED_GLOBALS: dict[str, tuple[str, ...]] = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}
_TORCH_LOAD = torch.load  # the real one, whatever the context below does to the attribute
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
_WO_DETAIL = re.compile(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", re.S)


def allowed_globals() -> list[Any]:
    """The allow-listed classes themselves (imported lazily: DeepSpeed is slow to import)."""
    out = []
    for module, names in ALLOWED_GLOBALS.items():
        mod = importlib.import_module(module)
        out.extend(getattr(mod, name) for name in names if hasattr(mod, name))
    return out


def _name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", f"<{type(f).__name__}>"))


def safe_load(f: str | os.PathLike[str] | IO[bytes], map_location: Any = "cpu", *, mmap: bool | None = None,
              **pickle_load_args: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with DeepSpeed's allow-list; one-line errors naming ``f``.

    Raises UnsafeCheckpointError when the file needs any other global (the payload never runs), and
    CheckpointError when it is not a readable torch file at all (truncated, not a pickle).
    """
    pickle_load_args.pop("pickle_module", None)
    pickle_load_args.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = _UNSUPPORTED_GLOBAL.search(text)
        if found:
            allowed = ", ".join(n for names in ALLOWED_GLOBALS.values() for n in names)
            raise UnsafeCheckpointError(
                f"refusing to load {_name(f)}: it needs the Python global {found[1].rstrip('.,')}, which "
                f"vitscale does not unpickle (allowed: tensors, plain containers, DeepSpeed's {allowed}); "
                f"a checkpoint vitscale or DeepSpeed wrote never needs it") from None
        detail = _WO_DETAIL.search(text)
        raise UnsafeCheckpointError(f"refusing to load {_name(f)}: not a weights-only torch file (torch's "
                                    f"weights-only unpickler: {one_line(detail[1] if detail else text, 200)})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {_name(f)} as a torch file ({type(exc).__name__}: "
                              f"{one_line(exc, 200)})") from None


def _guarded_load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: bool | None = None,
                  mmap: bool | None = None, **pickle_load_args: Any) -> Any:
    """Drop-in for torch.load that ignores ``weights_only=False`` requests (DeepSpeed's)."""
    return safe_load(f, map_location, mmap=mmap, **pickle_load_args)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block ``torch.load`` is ``safe_load``: DeepSpeed's load_checkpoint and zero_to_fp32
    unpickle weights only. Re-entrant; restores the previous ``torch.load`` on exit."""
    previous = torch.load
    if previous is _guarded_load:
        yield
        return
    torch.load = _guarded_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = previous  # type: ignore[assignment]
