"""`vitscale/train.py`, run unchanged, with a RankProbe added to every Trainer it builds.

Used exactly like train.py under `deepspeed` and `torchrun` (same Hydra overrides, same `--local_rank`
handling, because it is train.py that runs). The probe is attached by wrapping `Trainer.__init__`, so
train.py's own `from vitscale.engine import Trainer` picks it up.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "vitscale" / "train.py"


def _attach_probe() -> None:
    from rank_probe import RankProbe
    from vitscale.engine.trainer import Trainer

    original_init = Trainer.__init__

    def init_with_probe(self: Trainer, cfg: Any, callbacks: Iterable[Any] = (), **kwargs: Any) -> None:
        original_init(self, cfg, callbacks=[*callbacks, RankProbe(self)], **kwargs)

    Trainer.__init__ = init_with_probe  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(REPO)]
    _attach_probe()
    sys.argv[0] = str(TRAIN_PY)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")
