"""The console, in one place: what a user reads while a run goes, without the dependencies' noise.

Each entry point (vitscale/train.py, vitscale/evaluate.py, launch/ray_trial.py) calls ``setup_console()``
once its logging is configured (train.py also once before anything imports DeepSpeed, whose
accelerator warning is printed at import time). It

- keeps DeepSpeed's own logger (it has its own stdout handler and does not propagate) at WARNING;
- hides the specific dependency messages listed in ``LOG_NOISE`` / ``WARNING_NOISE`` below, each
  named with the reason it is harmless here (never all warnings: anything not listed still prints);
- makes ranks other than 0 print WARNING and above only (they repeat rank 0's progress otherwise),
  and DeepSpeed's warnings, which derive from the config and are the same on every rank, on rank 0 only;
- counts what it hid (``hidden``) and says so in one line at exit on rank 0.

Files are untouched (Hydra's ``train.log`` keeps what its level lets through). ``VITSCALE_VERBOSE=1``
turns all of this off: the dependencies print everything they print by themselves.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERBOSE_ENV = "VITSCALE_VERBOSE"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Noise:
    """One known-harmless message: ``pattern`` is matched (re.search) against the message text."""

    name: str
    pattern: str
    why: str
    category: type[Warning] | None = None  # for WARNING_NOISE: the warning class it is raised as

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text) is not None


# Records of DeepSpeed's logger ("DeepSpeed") that carry no information for a vitscale user.
LOG_NOISE: tuple[Noise, ...] = (
    # Printed at `import deepspeed` in every process (launcher included) whenever its accelerator
    # probe falls through to the CPU. vitscale's own "rank r/N ... via <launcher>, <backend>" line
    # names the device actually used; on a machine with an NVIDIA device node the warning is kept,
    # since there it means CUDA is broken (see _cpu_only_machine).
    Noise("deepspeed-cpu-accelerator", r"^Setting accelerator to CPU\.",
          "the run is on CPU by design; vitscale's rank line names device and backend"),
    # DeepSpeed's WarmupLR/WarmupDecayLR get_lr() is called once by deepspeed.initialize before the
    # first step (last_batch_iteration == -1); the schedule itself is vitscale's and is logged as lr.
    Noise("deepspeed-lr-before-start", r"^Attempting to get learning rate from scheduler before it has started",
          "deepspeed.initialize reads the lr once before step 1; harmless"),
    # vitscale sets zero_allow_untested_optimizer on purpose (engine/deepspeed_config.py): its SGD /
    # AdamW under ZeRO 0-3 are tested against each other (tests/test_train_dist.py, ZeRO-3 == ZeRO-0).
    Noise("deepspeed-untested-optimizer", r"You are using ZeRO with an untested optimizer",
          "vitscale's optimizers are tested under every ZeRO stage"),
)

# Python warnings (warnings.warn) raised inside dependencies, not by anything a user can change.
WARNING_NOISE: tuple[Noise, ...] = (
    # torch 2.13 deprecates the *_tensor collectives that DeepSpeed's ZeRO 1-3 call on every step
    # (c10d_logger.py); printed per rank, repeatedly. DeepSpeed's to fix, not the user's.
    Noise("torch-collective-deprecated",
          r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
          "DeepSpeed's ZeRO calls these collectives; nothing for the user to change", FutureWarning),
)

# Loggers whose INFO records are dependency chatter: DeepSpeed's op builders probe the C compiler
# through setuptools' distutils ("compilers.C.base: gcc ... -laio") at import, on every rank.
QUIET_LOGGERS: tuple[str, ...] = ("compilers",)

hidden: collections.Counter[str] = collections.Counter()
_state: dict[str, Any] = {}


def verbose() -> bool:
    """``VITSCALE_VERBOSE=1`` (or true/yes): show the dependencies' logs and warnings as they come."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def env_rank() -> int:
    """The global rank the launcher exported (deepspeed, torchrun, Ray Train), else 0."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _cpu_only_machine() -> bool:
    return not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


class DeepSpeedFilter(logging.Filter):
    """On DeepSpeed's logger: drops LOG_NOISE everywhere, and anything below ERROR on ranks other than 0."""

    def __init__(self, rank: int, noise: tuple[Noise, ...] = LOG_NOISE) -> None:
        super().__init__()
        self.rank = rank
        self.noise = tuple(n for n in noise if n.name != "deepspeed-cpu-accelerator" or _cpu_only_machine())

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for n in self.noise:
            if n.matches(text):
                hidden[n.name] += 1
                return False
        if self.rank != 0 and record.levelno < logging.ERROR:
            hidden["deepspeed-other-rank"] += 1
            return False
        return True


class ConsoleFilter(logging.Filter):
    """On the console handlers: ranks other than 0 print WARNING+ only; QUIET_LOGGERS print WARNING+."""

    def __init__(self, rank: int, quiet: tuple[str, ...] = QUIET_LOGGERS) -> None:
        super().__init__()
        self.rank, self.quiet = rank, quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if any(record.name == q or record.name.startswith(q + ".") for q in self.quiet):
            hidden[f"{record.name.split('.')[0]}-info"] += 1
            return False
        if self.rank != 0:
            hidden["other-rank-info"] += 1
            return False
        return True


def _show_warning(original: Any) -> Any:
    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        for n in WARNING_NOISE:
            if (n.category is None or issubclass(category, n.category)) and n.matches(str(message)):
                hidden[n.name] += 1
                return
        original(message, category, filename, lineno, file, line)

    show.vitscale_console = True  # type: ignore[attr-defined]
    return show


def _console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _quiet_shm_build_print() -> None:
    """DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every
    rank each time it loads its (cached) CPU shared-memory collective op: redirected to DEBUG."""
    import importlib

    module = importlib.import_module("deepspeed.comm.torch")
    fn = getattr(module, "build_shm_op", None)
    if fn is None or getattr(fn, "vitscale_console", False):
        return

    def build_shm_op() -> Any:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = fn()
        for line in buf.getvalue().splitlines():
            if line.strip():
                hidden["deepspeed-shm-built"] += 1
                log.debug("%s", line)
        return result

    build_shm_op.vitscale_console = True  # type: ignore[attr-defined]
    module.build_shm_op = build_shm_op  # type: ignore[union-attr]


def setup_console(rank: int | None = None, *, deepspeed: bool = False, report_at_exit: bool = True) -> None:
    """Idempotent; call before DeepSpeed is imported and again once logging is configured (handlers exist).
    ``deepspeed=True`` (processes that will start DeepSpeed's engine) imports DeepSpeed now to quiet a print of it."""
    if verbose():
        return
    rank = env_rank() if rank is None else int(rank)
    if "DS_ACCELERATOR" not in os.environ and _cpu_only_machine() and "deepspeed" not in sys.modules:
        # No GPU device node: DeepSpeed would settle on its CPU accelerator anyway (it still probes
        # for XPU/NPU/HPU packages first, so only where none of those is installed).
        import importlib.util

        others = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_mlu", "torch_sdaa")
        if not any(importlib.util.find_spec(m) for m in others):
            os.environ["DS_ACCELERATOR"] = "cpu"
    ds = logging.getLogger("DeepSpeed")  # created now if DeepSpeed is not imported yet; it reuses it
    if not any(isinstance(f, DeepSpeedFilter) for f in ds.filters):
        ds.addFilter(DeepSpeedFilter(rank))
    for handler in _console_handlers():
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter(rank))
    if not getattr(warnings.showwarning, "vitscale_console", False):
        warnings.showwarning = _show_warning(warnings.showwarning)
    if deepspeed:
        _quiet_shm_build_print()
    if report_at_exit and rank == 0 and not _state.get("atexit"):
        _state["atexit"] = True
        atexit.register(_report)


def summary() -> str | None:
    """One line on what was hidden on this rank, or None when nothing was."""
    total = sum(hidden.values())
    if not total:
        return None
    parts = ", ".join(f"{name} {count}" for name, count in sorted(hidden.items()))
    return f"console: {total} dependency lines hidden on this rank ({parts}); {VERBOSE_ENV}=1 shows them"


def _report() -> None:
    line = summary()
    streams = [getattr(h, "stream", None) for h in _console_handlers()]
    if line and not any(getattr(s, "closed", False) for s in streams):  # e.g. a test runner closed them
        log.info("%s", line)
