"""The `sweep:` block of a composed config, parsed into typed, validated specs.

A sweep config (configs/sweep/NAME.yaml, package `_global_`) pulls in a base experiment through its
defaults list, may override any training key, and adds one `sweep:` block. Everything here is checked
before Ray starts so a typo costs a second, not a cluster start-up; each problem is reported as one
line naming the key and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
_MISSING = object()


class SweepConfigError(ValueError):
    """A sweep config problem the user must fix; the message is a single line naming the key."""


@dataclass(frozen=True)
class Domain:
    """One search dimension: `kind` is a DOMAIN_KINDS entry, `values` its list or its [low, high]."""

    kind: str
    values: tuple[Any, ...]

    @property
    def is_numeric_range(self) -> bool:
        return self.kind in ("uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler. ASHA's units are `time_attr` values: training steps by default, so
    `grace_period` and `max_t` read like `trainer.max_steps` rather than like report counts."""

    type: str = "asha"
    time_attr: str = "step"
    max_t: int | None = None  # None: the trial's trainer.max_steps
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class ResourceSpec:
    """What one trial asks of the cluster: a Ray Train worker group of `num_workers` ranks."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def per_trial(self) -> dict[str, float]:
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.gpus_per_worker:
            need["GPU"] = self.num_workers * self.gpus_per_worker
        return need


@dataclass(frozen=True)
class SweepSpec:
    """A parsed `sweep:` block (see docs/sweeps.md for every key)."""

    name: str
    search_space: dict[str, Domain]
    num_samples: int
    metric: str
    mode: str
    scheduler: SchedulerSpec
    resources: ResourceSpec
    max_concurrent_trials: int | None
    max_failures: int
    storage_path: str | None
    register_name: str | None
    register_alias: str
    seed: int | None
    extra_tags: dict[str, str] = field(default_factory=dict)


def _fail(key: str, what: str) -> SweepConfigError:
    return SweepConfigError(f"sweep.{key}: {what}")


def _as_dict(node: Any, key: str) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise _fail(key, f"expected a mapping, got {type(node).__name__} {node!r}")
    return dict(node)


def _number(value: Any, key: str, *, integer: bool = False, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"expected a number, got {value!r}")
    if integer and int(value) != value:
        raise _fail(key, f"expected an integer, got {value!r}")
    if positive and not value > 0:
        raise _fail(key, f"expected a positive number, got {value!r}")
    return int(value) if integer else float(value)


def parse_domain(key: str, node: Any) -> Domain:
    """`{loguniform: [1e-4, 1e-2]}`, `{choice: [a, b]}`, `{grid: [a, b]}`, `{uniform: [lo, hi]}`,
    `{randint: [lo, hi]}` (hi exclusive, as in Ray Tune)."""
    where = f"search_space.{key}"
    spec = _as_dict(node, where)
    if len(spec) != 1 or next(iter(spec)) not in DOMAIN_KINDS:
        raise _fail(where, f"expected one of {{{', '.join(k + ': [...]' for k in DOMAIN_KINDS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if isinstance(values, ListConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if not isinstance(values, (list, tuple)) or not values:
        raise _fail(where, f"{kind} expects a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Domain(kind, tuple(values))
    if len(values) != 2:
        raise _fail(where, f"{kind} expects [low, high], got {values!r}")
    low = _number(values[0], where, integer=kind == "randint")
    high = _number(values[1], where, integer=kind == "randint")
    if not low < high:
        raise _fail(where, f"{kind} expects low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise _fail(where, f"loguniform expects low > 0, got {low}")
    return Domain(kind, (low, high))


def parse_sweep(cfg: DictConfig) -> SweepSpec:
    """Read and check `cfg.sweep`; the training keys it points at are checked by validate_against."""
    if "sweep" not in cfg or cfg.sweep is None:
        raise SweepConfigError("no `sweep:` block in the composed config: pass +sweep=NAME (configs/sweep/NAME.yaml)")
    raw = _as_dict(cfg.sweep, "")
    known = {"name", "search_space", "num_samples", "metric", "mode", "scheduler", "resources",
             "max_concurrent_trials", "failure", "storage_path", "register", "seed", "tags"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(unknown[0], f"unknown key; expected one of {sorted(known)}")

    space_node = _as_dict(raw.get("search_space"), "search_space")
    if not space_node:
        raise _fail("search_space", "is empty: name at least one config key to sweep, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
    space = {str(k): parse_domain(str(k), v) for k, v in space_node.items()}

    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise _fail("mode", f"expected 'max' or 'min', got {mode!r}")
    metric = raw.get("metric")
    if not isinstance(metric, str) or not metric:
        raise _fail("metric", f"expected the name of a reported eval metric, got {metric!r}")

    sched_raw = _as_dict(raw.get("scheduler"), "scheduler")
    sched_known = {"type", "time_attr", "max_t", "grace_period", "reduction_factor"}
    if set(sched_raw) - sched_known:
        raise _fail(f"scheduler.{sorted(set(sched_raw) - sched_known)[0]}", f"unknown key; expected one of {sorted(sched_known)}")
    sched_type = sched_raw.get("type", "asha")
    if sched_type not in SCHEDULERS:
        raise _fail("scheduler.type", f"expected one of {list(SCHEDULERS)}, got {sched_type!r}")
    max_t = sched_raw.get("max_t")
    scheduler = SchedulerSpec(
        type=sched_type,
        time_attr=str(sched_raw.get("time_attr", "step")),
        max_t=None if max_t is None else int(_number(max_t, "scheduler.max_t", integer=True, positive=True)),
        grace_period=int(_number(sched_raw.get("grace_period", 1), "scheduler.grace_period", integer=True, positive=True)),
        reduction_factor=_number(sched_raw.get("reduction_factor", 2), "scheduler.reduction_factor", positive=True),
    )
    if scheduler.reduction_factor <= 1:
        raise _fail("scheduler.reduction_factor", f"expected > 1, got {scheduler.reduction_factor}")

    res_raw = _as_dict(raw.get("resources"), "resources")
    res_known = {"num_workers", "cpus_per_worker", "gpus_per_worker"}
    if set(res_raw) - res_known:
        raise _fail(f"resources.{sorted(set(res_raw) - res_known)[0]}", f"unknown key; expected one of {sorted(res_known)}")
    resources = ResourceSpec(
        num_workers=int(_number(res_raw.get("num_workers", 2), "resources.num_workers", integer=True, positive=True)),
        cpus_per_worker=_number(res_raw.get("cpus_per_worker", 1), "resources.cpus_per_worker", positive=True),
        gpus_per_worker=_number(res_raw.get("gpus_per_worker", 0), "resources.gpus_per_worker"),
    )
    if resources.gpus_per_worker < 0:
        raise _fail("resources.gpus_per_worker", f"expected >= 0, got {resources.gpus_per_worker}")

    mct = raw.get("max_concurrent_trials")
    failure = _as_dict(raw.get("failure"), "failure")
    if set(failure) - {"max_failures"}:
        raise _fail("failure", f"only max_failures is supported, got {sorted(failure)}")
    register = _as_dict(raw.get("register"), "register")
    if set(register) - {"name", "alias"}:
        raise _fail("register", f"expected keys name, alias; got {sorted(register)}")
    seed = raw.get("seed")
    tags = {str(k): str(v) for k, v in _as_dict(raw.get("tags"), "tags").items()}
    return SweepSpec(
        name=str(raw.get("name") or cfg.get("name") or "sweep"),
        search_space=space,
        num_samples=int(_number(raw.get("num_samples", 1), "num_samples", integer=True, positive=True)),
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        resources=resources,
        max_concurrent_trials=None if mct is None else int(_number(mct, "max_concurrent_trials", integer=True, positive=True)),
        max_failures=int(_number(failure.get("max_failures", 2), "failure.max_failures", integer=True)),
        storage_path=raw.get("storage_path"),
        register_name=register.get("name"),
        register_alias=str(register.get("alias") or "sweep-best"),
        seed=None if seed is None else int(_number(seed, "seed", integer=True)),
        extra_tags=tags,
    )


def validate_against(cfg: DictConfig, spec: SweepSpec) -> None:
    """Every swept key must name an existing leaf of the composed training config, with values of a
    compatible type: a misspelt key would otherwise silently sweep nothing."""
    for key, domain in spec.search_space.items():
        where = f"search_space.{key}"
        if key.split(".")[0] in ("sweep", "hydra"):
            raise _fail(where, "cannot sweep the sweep/hydra settings themselves; name a training key")
        current = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if current is None and key.startswith("model."):  # null: the registry's value for model.name
            current = _registry_value(cfg, key.partition(".")[2], current)
        if current is _MISSING:
            parent, _, leaf = key.rpartition(".")
            siblings = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            hint = f"; keys under {parent or 'the root'}: {sorted(siblings)}" if isinstance(siblings, DictConfig) else ""
            raise _fail(where, f"'{key}' does not exist in the composed training config{hint}")
        if isinstance(current, DictConfig):
            raise _fail(where, f"'{key}' is a config section; sweep one of its values, e.g. "
                               f"{key}.{next(iter(current), 'KEY')}")
        if isinstance(current, ListConfig) and domain.kind not in ("grid", "choice"):
            raise _fail(where, f"'{key}' is a list; a {domain.kind} range needs a number")
        if domain.is_numeric_range and current is not None and (isinstance(current, bool) or not isinstance(current, (int, float))):
            raise _fail(where, f"'{key}' is {current!r} ({type(current).__name__}); a {domain.kind} range needs a number")
        if domain.kind in ("grid", "choice") and isinstance(current, (int, float)) and not isinstance(current, bool):
            bad = [v for v in domain.values if isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:
                raise _fail(where, f"'{key}' is a number ({current!r}) but the {domain.kind} lists {bad[0]!r}")
    if spec.scheduler.max_t is not None and spec.scheduler.time_attr == "step":
        max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
        if isinstance(max_steps, int) and spec.scheduler.max_t > max_steps:
            raise _fail("scheduler.max_t", f"{spec.scheduler.max_t} steps exceeds trainer.max_steps={max_steps}")
    if spec.scheduler.grace_period > resolved_max_t(cfg, spec):
        raise _fail("scheduler.grace_period", f"{spec.scheduler.grace_period} exceeds max_t={resolved_max_t(cfg, spec)}")


def _registry_value(cfg: DictConfig, field: str, default: Any) -> Any:
    """A model field the YAML leaves to the registry (vitscale.config.resolve_model), as the trial sees it."""
    from vitscale.config import ConfigError, resolve_model

    try:
        return getattr(resolve_model(cfg), field, default)
    except ConfigError:
        return default


def check_reporting(cfg: DictConfig, spec: SweepSpec) -> None:
    """A trial reports to Tune at each evaluation and hands over the checkpoint saved at that step,
    so the training config must evaluate during training and checkpoint on evaluation steps."""
    if not spec.metric.startswith("eval/"):
        raise _fail("metric", f"{spec.metric!r}: trials report evaluation metrics, e.g. eval/top1 (mode max) "
                              f"or eval/loss (mode min)")
    eval_every = int(OmegaConf.select(cfg, "eval.every", default=0) or 0)
    if eval_every <= 0:
        raise SweepConfigError("eval.every must be > 0 in a sweep: trials report at each evaluation, and "
                               "with eval.every=0 ASHA would see one result per trial, at its end")
    if not OmegaConf.select(cfg, "data.val_shards", default=None):
        raise SweepConfigError(f"data.val_shards is not set: the sweep metric {spec.metric} comes from the "
                               f"validation set")
    ckpt_every = int(OmegaConf.select(cfg, "trainer.checkpoint_every", default=0) or 0)
    if ckpt_every > 0 and ckpt_every % eval_every:
        raise SweepConfigError(
            f"trainer.checkpoint_every={ckpt_every} must be a multiple of eval.every={eval_every} in a "
            f"sweep, so each checkpoint handed to Ray carries the metrics of its own step")


def resolved_max_t(cfg: DictConfig, spec: SweepSpec) -> int:
    """ASHA's horizon: the explicit max_t, else the trial's step budget."""
    if spec.scheduler.max_t is not None:
        return spec.scheduler.max_t
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    if spec.scheduler.time_attr != "step" or not isinstance(max_steps, int):
        raise _fail("scheduler.max_t", f"must be set when time_attr is {spec.scheduler.time_attr!r}")
    return max_steps


def grid_size(spec: SweepSpec) -> int:
    """Trials Tune will run: num_samples repeats of the full grid (random dimensions sampled each)."""
    return spec.num_samples * math.prod(len(d.values) for d in spec.search_space.values() if d.kind == "grid")
