"""Training entry point: ``deepspeed vitscale/train.py +experiment=vit_h14_jft`` (or torchrun, or python).

Thin on purpose: Hydra composes the config, vitscale.engine.Trainer does the work. The DeepSpeed
launcher appends ``--local_rank=N``, which Hydra would reject, so it is removed before Hydra parses
(LOCAL_RANK is in the environment anyway).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python vitscale/train.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from vitscale.engine.distributed import strip_local_rank

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
log = logging.getLogger("vitscale.train")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vitscale.engine import Trainer, TrainingDiverged

    try:
        Trainer(cfg).fit()
    except TrainingDiverged as err:
        log.error("%s", err)
        sys.exit(2)


def cli() -> None:
    sys.argv = strip_local_rank(sys.argv)
    main()


if __name__ == "__main__":
    cli()
