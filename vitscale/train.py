"""Training entry point: ``deepspeed vitscale/train.py +experiment=vit_h14_jft`` (or torchrun, or python).

Thin on purpose: Hydra composes the config, vitscale.start validates it and resolves URIs,
vitscale.engine.Trainer does the work. The DeepSpeed
launcher appends ``--local_rank=N``, which Hydra would reject, so it is removed before Hydra parses
(LOCAL_RANK is in the environment anyway).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python vitscale/train.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from vitscale.console import setup_console

setup_console()  # before anything imports DeepSpeed (it warns at import); again below once Hydra set up logging
from vitscale.engine.distributed import strip_local_rank  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
log = logging.getLogger("vitscale.train")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_console(deepspeed=True)  # Hydra's handlers exist now: ranks other than 0 to WARNING, noise hidden
    from vitscale.config import ConfigError
    from vitscale.data import ShardListError
    from vitscale.engine import TrainingDiverged
    from vitscale.engine.checkpoint import CheckpointError
    from vitscale.start import build_trainer
    from vitscale.tracking import TrackingAuthError, TrackingUnreachable

    try:
        build_trainer(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), run_params=predicted_plan(cfg)).fit()
    except (ConfigError, ShardListError, TrainingDiverged, LookupError) as err:  # the user's to fix: one line, exit 2
        log.error("%s", err)
        sys.exit(2)
    except (CheckpointError, TrackingUnreachable, TrackingAuthError) as err:  # the environment's: one line, exit 1
        log.error("%s", err)
        sys.exit(1)


def predicted_plan(cfg: DictConfig) -> dict[str, object]:
    """vitscale.plan's memory/time prediction for this run, logged as MLflow params (rank 0 only; a
    failure to plan costs a warning, never the run)."""
    if int(os.environ.get("RANK", "0")) != 0 or not cfg.tracking.enabled:
        return {}
    try:
        from vitscale.plan import plan_summary

        return plan_summary(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except Exception as exc:  # noqa: BLE001
        log.warning("plan not logged (%s: %s)", type(exc).__name__, exc)
        return {}


def cli() -> None:
    sys.argv = strip_local_rank(sys.argv)
    main()


if __name__ == "__main__":
    cli()
