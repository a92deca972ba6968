"""The training config as typed sections, validated once at the entry point (torchtitan's JobConfig).

The YAML tree under configs/ and every command line stay as they are: Hydra composes the DictConfig,
``validate(cfg, world_size)`` checks it against these dataclasses (types, unknown keys) and the rules
that span sections (batch divisibility, intervals, shard lists), and raises ``ConfigError`` whose
message is one line naming the key, the value found and what was expected. ``vitscale/train.py`` and
``launch/sweep.py`` call it before any worker starts and exit 2 on it.

Sections that already have a schema next to their code are validated by it: ``model`` by
``vitscale.models.ModelConfig``, ``data`` by ``vitscale.data.config.DataConfig``, ``tracking`` by
``vitscale.tracking.settings.TrackingSettings``; ``deepspeed.zero_optimization`` and
``deepspeed.extra`` are passed to DeepSpeed as written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration mistake, said in one line (the entry points exit 2 on it)."""


@dataclass
class ActivationCheckpointingConfig:
    policy: str = "none"
    """none | torch | deepspeed | fairscale_offload: which library recomputes a block's activations."""
    every: int = 1
    """Checkpoint every k-th transformer block (1 = all)."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    global_batch_size: int = 4096
    """Images per optimizer step over all ranks: it sets the optimisation, whatever the cluster."""
    micro_batch_size: int = 32
    """Images per rank per forward: a memory knob; accumulation = global / (micro x world)."""
    log_every: int = 50
    """A metrics record (and the only host read-back of the loop) every N steps."""
    checkpoint_every: int = 1000
    """A DeepSpeed checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Older step checkpoints are deleted; 0 keeps all."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."""
    loss: str = "softmax_xent"
    """softmax_xent | sigmoid_xent (big_vision's choice for JFT / i21k)."""
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    dist_timeout_s: float = 1800.0
    """A collective waiting longer than this fails the job."""
    nan_patience: int = 5
    """This many non-finite steps in a row: checkpoint and stop (0: never stop)."""
    export_at_end: bool = True
    """Consolidate the final checkpoint to safetensors on rank 0."""
    compile: str = "none"
    """none | blocks | model: torch.compile per transformer block or of the whole forward."""
    compile_backend: str = "inductor"
    """torch.compile backend (aot_eager traces without code generation)."""
    compile_eager_rng: bool = False
    """Inductor's random ops (dropout) draw from eager's RNG: compiled runs see the eager masks."""
    peak_flops: float | None = None
    """Per-device peak FLOP/s for MFU; null: vitscale.hardware's GPU table or a CPU matmul probe."""


@dataclass
class ScheduleConfig:
    name: str = "warmup_linear_decay"
    """warmup_linear_decay | warmup_cosine | constant."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | sgd (torch's; DeepSpeedCPUAdam under CUDA optimizer offload)."""
    lr: float = 1e-3
    betas: list[float] | None = None
    eps: float | None = None
    weight_decay: float = 0.0
    decay_1d_params: bool = True
    """False spares biases, norm scales and position embeddings from weight decay."""
    momentum: float | None = None
    grad_clip: float = 1.0
    """Clip the global gradient norm (0: off)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    topk: list[int] = field(default_factory=lambda: [1, 5])
    batch_size: int = 32


@dataclass
class FinetuneConfig:
    source: str | None = None
    """models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path or a local export directory."""
    num_classes: int = 0
    head_zero_init: bool = True
    posemb_resize: str = "timm"
    """timm (bicubic) | jax (the official loader's scipy.ndimage.zoom, order 1)."""


@dataclass
class RunConfig:
    """The engine-facing sections; model/data/tracking/deepspeed are checked by their own schemas."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "outputs/run"
    resume: str | None = "auto"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


_CHOICES = {
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.loss": ("softmax_xent", "sigmoid_xent"),
    "trainer.compile": ("none", "blocks", "model"),
    "trainer.activation_checkpointing.policy": ("none", "torch", "deepspeed", "fairscale_offload"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule.name": ("warmup_linear_decay", "warmup_cosine", "constant"),
    "finetune.posemb_resize": ("timm", "jax"),
}
_OWN_SECTIONS = ("name", "seed", "output_dir", "resume", "trainer", "optim", "eval", "finetune")


def _typed(cfg: DictConfig) -> RunConfig:
    """The engine-facing sections as RunConfig; omegaconf's type and key errors become one line."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(resolved, dict)
        own = {k: resolved[k] for k in _OWN_SECTIONS if k in resolved}
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), own))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None
    assert isinstance(typed, RunConfig)
    return typed


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: DictConfig, world_size: int | None = None) -> RunConfig:
    """Every check that needs no worker, in one place; returns the typed engine-facing sections."""
    run = _typed(cfg)
    for key, allowed in _CHOICES.items():
        value = _get(run, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    t = run.trainer
    for key, value, low in (("trainer.max_steps", t.max_steps, 1), ("trainer.log_every", t.log_every, 1),
                            ("trainer.global_batch_size", t.global_batch_size, 1),
                            ("trainer.micro_batch_size", t.micro_batch_size, 1),
                            ("trainer.activation_checkpointing.every", t.activation_checkpointing.every, 1),
                            ("trainer.checkpoint_every", t.checkpoint_every, 0),
                            ("trainer.keep_checkpoints", t.keep_checkpoints, 0),
                            ("trainer.nan_patience", t.nan_patience, 0), ("eval.every", run.eval.every, 0),
                            ("eval.batch_size", run.eval.batch_size, 1), ("optim.lr", run.optim.lr, 0)):
        if value < low:
            raise ConfigError(f"{key}={value}: expected >= {low}")
    if world_size is not None:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size}: not divisible by trainer.micro_batch_size "
                f"({t.micro_batch_size}) x world size ({world_size}) = {per_step}")
    _check_sections(cfg, run)
    return run


def _check_sections(cfg: DictConfig, run: RunConfig) -> None:
    """model, data and tracking against their own schemas; the rules that span sections."""
    if "data" not in cfg or OmegaConf.is_missing(cfg.data, "train_shards") or not cfg.data.get("train_shards") \
            or cfg.data.get("train_shards") == "???":
        raise ConfigError("data.train_shards is not set: pass data.train_shards='/path/train-{000000..000099}.tar' "
                          "(or set the environment variable named in configs/data/<dataset>.yaml)")
    try:
        from vitscale.data.config import parse_data_config

        parse_data_config(cfg.data)
    except (ValueError, TypeError, OmegaConfBaseException) as exc:
        raise ConfigError(_first_line(exc, "data")) from None
    try:
        from vitscale.models import model_config

        kwargs = OmegaConf.to_container(cfg.model, resolve=True)
        assert isinstance(kwargs, dict)
        name = kwargs.pop("name")
        model_config(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except (ValueError, TypeError, KeyError, OmegaConfBaseException) as exc:
        raise ConfigError(_first_line(exc, "model")) from None
    tracking = cfg.get("tracking") or {}
    every, ckpt_every = int(tracking.get("register_every") or 0), run.trainer.checkpoint_every
    if every > 0 and (ckpt_every <= 0 or every % ckpt_every):
        raise ConfigError(f"tracking.register_every={every}: expected a multiple of trainer.checkpoint_every="
                          f"{ckpt_every} (intermediate versions are exported from checkpoints)")


def _first_line(exc: BaseException, section: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.startswith(section) else f"{section}: {text}"
