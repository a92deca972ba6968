"""Run a short Trainer.fit with every host read-back recorded (used by tests/test_loop_sync.py).

Launched by torchrun on 2 ranks; each rank writes ``<out>/host_reads_rank<r>.json``: a list of
(name, phase, step, caller file:line) for every call of ``Tensor.item``, ``Tensor.__float__``,
``Tensor.tolist``, ``Tensor.__bool__``, ``Tensor.__int__`` and ``torch.cuda.synchronize`` made while
training. ``phase`` is ``step`` inside
``train_step`` and ``between`` in the loop around it (``step`` is then the step just finished).

    torchrun --nproc_per_node 2 tests/dist_scripts/sync_probe.py OUT -- HYDRA_OVERRIDES...
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def record_host_reads(where: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    calls: list[tuple[str, str, int, str]] = []

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            calls.append((name, where["phase"], where["step"], f"{frame.f_code.co_filename}:{frame.f_lineno}"))
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in ("item", "__float__", "tolist", "__bool__", "__int__"):
        wrap(torch.Tensor, name)
    wrap(torch.cuda, "synchronize")
    return calls


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    from hydra import compose, initialize_config_dir

    from vitscale.engine import loop
    from vitscale.start import build_trainer

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={out}", *overrides])
    trainer = build_trainer(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    where: dict[str, Any] = {"phase": "setup", "step": 0}
    original_step = loop.train_step

    def step(*args: Any, **kwargs: Any) -> None:
        where.update(phase="step", step=trainer.step + 1)
        original_step(*args, **kwargs)
        where.update(phase="between", step=trainer.step + 1)  # run_loop increments right after

    loop.train_step = step
    calls = record_host_reads(where)
    result = trainer.fit()
    where["phase"] = "after"
    rank = int(os.environ.get("RANK", "0"))
    (out / f"host_reads_rank{rank}.json").write_text(json.dumps({"step": result["step"], "calls": calls}))


if __name__ == "__main__":
    main()
