"""torch.compile applied from outside the model (torchtitan's way): per transformer block or whole.

``trainer.compile``:
- ``none``: eager (the default until a GPU measurement says otherwise, see docs/training.md).
- ``blocks``: each ``model.blocks[i]`` compiled in place (``nn.Module.compile``): one graph, reused by
  every block of the same shape, so compile time does not grow with depth; parameter names and
  therefore checkpoints are unchanged.
- ``model``: the whole forward compiled in place: one graph, larger fusions, longer compile.

Shapes: the first evaluation (another batch size) or a fine-tune at another resolution recompiles
once, after which dynamo marks the changed dimension dynamic ("automatic dynamic shapes"), so no
further recompiles follow; ``log_recompiles`` makes that visible in the log.

``check_compile`` validates the keys once, before DeepSpeed starts. The composition matrix with
ZeRO and activation checkpointing is in docs/training.md.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
COMPILE_MODES = ("none", "blocks", "model")


def check_compile(mode: str, backend: str) -> None:
    """Refuse an unknown mode or backend with one line, before DeepSpeed starts.

    Every ZeRO stage (0-3) x activation-checkpointing policy (none, torch, deepspeed, fairscale
    offload) x mode (blocks, model) ran to the same losses as eager on CPU (docs/training.md has the
    matrix and the graph-break counts), so no combination is refused here.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode != "none" and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"trainer.compile_backend={backend!r}: expected one of "
                         f"{', '.join(sorted(torch._dynamo.list_backends(exclude_tags=())))}")


def apply_compile(model: nn.Module, mode: str, backend: str = "inductor", eager_rng: bool = False) -> None:
    """Compile ``model`` in place according to ``mode`` (``check_compile`` has accepted it).

    ``backend`` is torch.compile's: ``inductor`` generates kernels (Triton on CUDA, C++ on CPU);
    ``aot_eager`` traces the same graphs without code generation (the tests use it to check what
    composes in seconds rather than minutes). ``eager_rng``: random ops (dropout) draw from eager's
    RNG, so a compiled run sees the eager run's masks.
    """
    if mode == "none":
        return
    if eager_rng:
        # Inductor otherwise generates dropout masks with its own Philox streams: a valid, reproducible
        # training, but not the eager run's masks. This keeps compiled == eager (tests, A/B runs).
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    if mode == "blocks":
        for block in model.blocks:  # type: ignore[union-attr]
            block.compile(backend=backend)
    else:
        model.compile(backend=backend)
    log_recompiles()
    log.info("torch.compile: %s, backend %s (the first steps compile; a new input shape recompiles once)",
             mode, backend)


def log_recompiles() -> None:
    """Make dynamo say when and why it recompiles (a shape change at evaluation or fine-tuning)."""
    try:
        torch._logging.set_logs(recompiles=True)
    except (AttributeError, ValueError):  # pragma: no cover - older torch: recompiles stay silent
        pass
