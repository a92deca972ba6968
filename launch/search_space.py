"""Search space: sweep config domains -> Ray Tune domains, and sampled values -> a trial's config.

Keys stay dotted config paths ("optim.lr") all the way through, so Tune's results table, the MLflow
child run and the reproduction command line all name a trial's settings the way a user types them.
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from launch.spec import Domain


def to_tune_domain(domain: Domain) -> Any:
    from ray import tune

    if domain.kind == "grid":
        return tune.grid_search(list(domain.values))
    if domain.kind == "choice":
        return tune.choice(list(domain.values))
    low, high = domain.values
    if domain.kind == "uniform":
        return tune.uniform(low, high)
    if domain.kind == "loguniform":
        return tune.loguniform(low, high)
    if domain.kind == "randint":
        return tune.randint(int(low), int(high))
    raise ValueError(f"unknown search domain {domain.kind!r}")  # parse_domain rejects it first


def to_param_space(space: Mapping[str, Domain]) -> dict[str, Any]:
    return {key: to_tune_domain(domain) for key, domain in space.items()}


def apply_params(cfg: DictConfig, params: Mapping[str, Any]) -> DictConfig:
    """Set each sampled value at its dotted key, on a copy; interpolations that read the key follow."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in params.items():
        if OmegaConf.select(out, key, default=_Absent) is _Absent:
            raise KeyError(f"trial parameter {key!r} is not a key of the training config")
        OmegaConf.update(out, key, value, merge=False)
    return out


def as_overrides(params: Mapping[str, Any]) -> str:
    """`optim.lr=0.00123 model.drop_path=0.1`: pasted after `vitscale/train.py` it reruns the trial."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        if value is None:
            return "null"
        return str(value)

    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


class _Absent:
    """Sentinel: OmegaConf.select's default when a key is missing (None is a legal value)."""
