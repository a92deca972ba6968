"""One conversion from whatever a caller holds (Hydra's DictConfig, any Mapping, None) to a plain,
resolved dict: vitscale.config, vitscale.data.config and vitscale.tracking all take either."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plain_dict(cfg: Any, what: str = "config") -> dict[str, Any]:
    """A resolved plain dict (interpolations such as ${data.num_classes} evaluated); None -> {}."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            out = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(out, dict)
            return out  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{what}: expected a mapping, got {type(cfg).__name__}")
    return dict(cfg)
