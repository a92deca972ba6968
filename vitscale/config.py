"""The training config as typed sections, validated once at the entry point (torchtitan's JobConfig).

The YAML tree under configs/ and every command line stay as they are: Hydra composes the DictConfig,
``validate(cfg, world_size)`` checks it and returns a ``JobConfig``; below the entry points
(vitscale/train.py, launch/, the benchmarks) nothing reads a DictConfig. A mistake is a
``ConfigError`` whose message is one line naming the key, the value found and what was expected;
the entry points exit 2 on it.

Sections with a schema next to their code are parsed by it: ``model`` by the registry
(``vitscale.models.model_config``: the YAML names a variant and overrides what differs),
``data`` by ``vitscale.data.config.DataConfig``, ``tracking`` by
``vitscale.tracking.settings.TrackingSettings``; the rest by the dataclasses below.
``deepspeed.zero_optimization`` and ``deepspeed.extra`` go to DeepSpeed as written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitscale.plain import plain_dict

if TYPE_CHECKING:
    from vitscale.data.config import DataConfig
    from vitscale.models import ModelConfig
    from vitscale.tracking.settings import TrackingSettings


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
    overlap_grad_reduce: bool = True
    """ZeRO-0 fp32 on several ranks: all-reduce gradients in buckets while backward runs (as torch
    DDP does) instead of DeepSpeed's one all-reduce after it; same numbers (vitscale.engine.grad_reduce)."""
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
    """The sections without a schema of their own (OmegaConf checks types and keys against it)."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "outputs/run"
    resume: str | None = "auto"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_optimization: dict[str, Any]
    """Passed to DeepSpeed as written (configs/deepspeed/zero*.yaml)."""
    extra: dict[str, Any]
    """Deep-merged over the DeepSpeed config the engine builds: DeepSpeed's own keys, unchecked here."""


@dataclass(frozen=True)
class JobConfig:
    """The whole run, typed, built once by ``validate``; everything below the entry point takes it."""

    name: str
    seed: int
    output_dir: Path
    resume: str | None
    """As the user wrote it (auto | a path | runs:/ID | None): messages and the resume=auto rule use it."""
    trainer: TrainerConfig
    optim: OptimConfig
    eval: EvalConfig | None
    """None: the config has no eval section (no evaluation at all)."""
    finetune: FinetuneConfig
    model: "ModelConfig"
    """The registry's sizes for model.name with the YAML's overrides; num_classes from the data, or
    finetune.num_classes for a fine-tune."""
    data: "DataConfig"
    tracking: "TrackingSettings"
    deepspeed: DeepSpeedSection
    record: dict[str, Any]
    """The composed config as plain data, model section resolved: what a checkpoint stores beside its
    weights (resume=auto compares it), what the tracker logs as params."""


@dataclass(frozen=True)
class Start:
    """How the run starts, decided at the entry point (vitscale/start.py) before the engine exists:
    resume (auto, or a local checkpoint a runs:/ URI was resolved to), else the fine-tune source (a
    local export a models:/ URI was resolved to), else fresh. The engine sees local paths only."""

    resume: str | None = None
    """auto | a local checkpoint root or tag directory | None."""
    source: Path | None = None
    """The local export directory finetune.source resolved to."""
    lineage: dict[str, str] = field(default_factory=dict)
    """Tags naming the source model version and run actually loaded (the fine-tune run carries them)."""


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


def _typed(container: dict[str, Any]) -> RunConfig:
    """The sections without their own schema as RunConfig; omegaconf's type and key errors become one line."""
    try:
        own = {k: container[k] for k in _OWN_SECTIONS if k in container and (container[k] is not None or k == "resume")}
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


def _resolved(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    try:
        return plain_dict(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', None) or 'config'}: {str(exc).splitlines()[0]}") from None


def resolve_model(cfg: DictConfig | dict[str, Any], num_classes: int | None = None) -> "ModelConfig":
    """``model``: the registry's sizes for ``model.name`` (vitscale.models, the one table of sizes),
    overridden by the keys the YAML or the command line set (null = the registry's value)."""
    from vitscale.models import model_config

    section = dict(_resolved(cfg).get("model") or {})
    try:
        name = section.pop("name")
        kwargs = {k: tuple(v) if isinstance(v, list) and k == "stem_layers" else v
                  for k, v in section.items() if v is not None}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return model_config(str(name), **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(_first_line(exc, "model")) from None


def validate(cfg: DictConfig | dict[str, Any], world_size: int | None = None) -> JobConfig:
    """Every check that needs no worker, in one place; returns the whole run, typed."""
    container = _resolved(cfg)
    run = _typed(container)
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
    return _job(container, run)


def _job(container: dict[str, Any], run: RunConfig) -> JobConfig:
    """model, data, tracking and deepspeed against their own schemas; the rules that span sections."""
    data = container.get("data") or {}
    if not data.get("train_shards") or data.get("train_shards") == "???":
        raise ConfigError("data.train_shards is not set: pass data.train_shards='/path/train-{000000..000099}.tar' "
                          "(or set the environment variable named in configs/data/<dataset>.yaml)")
    try:
        from vitscale.data.config import parse_data_config

        data_config = parse_data_config(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_first_line(exc, "data")) from None
    num_classes = run.finetune.num_classes if run.finetune.source else data_config.num_classes
    model = resolve_model(container, num_classes=int(num_classes))
    try:
        from vitscale.tracking.settings import TrackingSettings

        tracking = TrackingSettings.from_mapping(container.get("tracking"), resume=run.resume,
                                                 output_dir=run.output_dir)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_first_line(exc, "tracking")) from None
    every, ckpt_every = tracking.register_every or 0, run.trainer.checkpoint_every
    if every > 0 and (ckpt_every <= 0 or every % ckpt_every):
        raise ConfigError(f"tracking.register_every={every}: expected a multiple of trainer.checkpoint_every="
                          f"{ckpt_every} (intermediate versions are exported from checkpoints)")
    ds = container.get("deepspeed") or {}
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict) or int(zero.get("stage", 0)) not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization={zero!r}: expected a mapping with stage 0, 1, 2 or 3")
    record = dict(container)
    record["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in model.to_dict().items()}
    return JobConfig(
        name=run.name, seed=run.seed, output_dir=Path(run.output_dir), resume=run.resume, trainer=run.trainer,
        optim=run.optim, eval=run.eval if container.get("eval") is not None else None, finetune=run.finetune,
        model=model, data=data_config, tracking=tracking,
        deepspeed=DeepSpeedSection(zero_optimization=dict(zero), extra=dict(ds.get("extra") or {})),
        record=record)


def _first_line(exc: BaseException, section: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.startswith(section) else f"{section}: {text}"
