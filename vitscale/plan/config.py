"""Compose the planner's Hydra config (configs/plan.yaml = the training tree + a ``plan:`` section)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "plan") -> DictConfig:
    """The same composition ``python -m vitscale.plan OVERRIDES`` does (no run directory, no logging)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
