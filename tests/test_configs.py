"""Config composition (every experiment, without running), the DeepSpeed JSON derived from it, and
the launcher-argument handling of the entry point."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vitscale.config import validate
from vitscale.engine.deepspeed_config import batch_plan, build, resolve_precision
from vitscale.engine.distributed import strip_local_rank
from vitscale.models import model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
CPU = torch.device("cpu")


def _compose(*overrides: str, shards: bool = True):
    """The composed config; with ``shards`` a shard list, so vitscale.config.validate accepts it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=(["data.train_shards='/x/train-{000000..000009}.tar'"] if shards else [])
                       + list(overrides))


def test_all_experiments_listed() -> None:
    expected = {"vit_b16_jft", "vit_l16_jft", "vit_h14_jft", "r50_vit_b16_jft", "vit_b16_i21k",
                "finetune_384", "demo_pretrain", "demo_finetune"}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_into_a_valid_model_and_deepspeed_config(experiment: str) -> None:
    cfg = _compose(f"+experiment={experiment}", "finetune.source=/nowhere")
    job = validate(cfg)  # the model resolved from the registry: raises on unknown keys or inconsistent sizes
    assert job.model == model_config(job.model.name, **{k: v for k, v in job.model.to_dict().items() if k != "name"})
    world = 8 if cfg.trainer.global_batch_size >= 1024 else 2
    ds = build(job, world, precision="fp32", device=CPU)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["gradient_clipping"] == 1.0
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.trainer.max_steps


def test_paper_pretraining_recipe() -> None:
    """Table 3 / sec 4.1 values, so a config edit cannot silently change the reproduction."""
    cfg = _compose("+experiment=vit_h14_jft")
    assert (cfg.optim.name, list(cfg.optim.betas), cfg.optim.weight_decay) == ("adamw", [0.9, 0.999], 0.1)
    job = validate(cfg)
    assert cfg.optim.lr == 3e-4 and cfg.trainer.global_batch_size == 4096 and job.model.img_size == 224
    assert (job.model.embed_dim, job.model.depth, job.model.patch_size) == (1280, 32, 14)  # from the registry
    sched = build(job, 64, precision="bf16", device=CPU)["scheduler"]
    assert sched["type"] == "WarmupDecayLR"
    assert sched["params"]["warmup_num_steps"] == 10_000 and sched["params"]["warmup_type"] == "linear"
    assert cfg.deepspeed.zero_optimization.stage == 3
    assert {e: _compose(f"+experiment={e}").optim.lr for e in ("vit_b16_jft", "vit_l16_jft", "vit_b16_i21k")} == \
        {"vit_b16_jft": 8e-4, "vit_l16_jft": 4e-4, "vit_b16_i21k": 1e-3}


def test_finetune_recipe() -> None:
    cfg = _compose("+experiment=finetune_384", "finetune.source=/x")
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 0.0)
    job = validate(cfg)
    assert cfg.trainer.global_batch_size == 512 and job.model.img_size == 384
    assert build(job, 16, precision="bf16", device=CPU)["scheduler"]["type"] == "WarmupCosineLR"


@pytest.mark.parametrize("choice,stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_deepspeed_group_choices(choice: str, stage: int) -> None:
    cfg = _compose(f"deepspeed={choice}", "trainer.global_batch_size=64", "trainer.micro_batch_size=8",
                   "+deepspeed.extra.wall_clock_breakdown=true")
    ds = build(validate(cfg), 4, precision="bf16", device=CPU)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["wall_clock_breakdown"] is True  # deepspeed.extra merges last
    if choice == "zero3_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_global_batch_must_divide() -> None:
    assert batch_plan(4096, 16, 64).accumulation == 4
    with pytest.raises(ValueError, match="trainer.global_batch_size=100 is not divisible"):
        batch_plan(100, 16, 2)


def test_precision_auto_is_fp32_on_cpu() -> None:
    from vitscale.engine.deepspeed_config import cpu_has_native_bf16

    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="trainer.precision='fp8'"):
        resolve_precision("fp8", CPU)


def test_unset_jft_paths_give_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscale.config import ConfigError

    monkeypatch.delenv("JFT_TRAIN_SHARDS", raising=False)
    with pytest.raises(ConfigError, match="data.train_shards is not set"):
        validate(_compose("+experiment=vit_b16_jft", shards=False))
    monkeypatch.setenv("JFT_TRAIN_SHARDS", "/data/jft-{000000..000009}.tar")
    cfg = _compose("+experiment=vit_b16_jft", shards=False)
    validate(cfg)
    assert cfg.data.train_shards == "/data/jft-{000000..000009}.tar"


@pytest.mark.parametrize("argv,expected", [
    (["train.py", "--local_rank=1", "seed=3"], ["train.py", "seed=3"]),
    (["train.py", "seed=3", "--local_rank", "1"], ["train.py", "seed=3"]),
    (["train.py", "--local-rank=0", "a=b"], ["train.py", "a=b"]),
    (["train.py", "trainer.max_steps=5"], ["train.py", "trainer.max_steps=5"]),
])
def test_local_rank_argument_is_stripped(argv: list[str], expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(argv) == expected


def test_demo_sees_a_real_patch_grid_and_fine_tunes_higher() -> None:
    """Issue 17: the demo's Figure 7 panels need at least a 4 x 4 grid in pre-training and more tokens
    in fine-tuning, at a higher resolution, on whole epochs of the 60k Fashion-MNIST images."""
    pre = validate(_compose("+experiment=demo_pretrain"))
    fine = validate(_compose("+experiment=demo_finetune", "finetune.source=/nowhere"))
    assert min(pre.model.grid_size) >= 4 and min(fine.model.grid_size) > min(pre.model.grid_size)
    assert fine.model.img_size > pre.model.img_size and fine.model.patch_size == pre.model.patch_size
    assert {k: v for k, v in fine.model.to_dict().items() if k != "img_size"} == \
        {k: v for k, v in pre.model.to_dict().items() if k != "img_size"}  # the same network, more tokens
    for job in (pre, fine):
        assert (job.trainer.max_steps * job.trainer.global_batch_size) % 60_000 < job.trainer.global_batch_size
