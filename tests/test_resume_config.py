"""resume=auto compares the checkpoint's stored config with the run's (issue 16), in process.

The end-to-end refusal through train.py (exit 2, one line) is in tests/test_elastic.py, which has a
checkpoint at hand; here the rules: which keys may change, what the one line says, that an explicit
resume=PATH only warns, and that checkpoints without a stored config are not compared.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from vitscale.config import ConfigError
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.trainer import Trainer

BASE = {
    "name": "a", "seed": 0, "output_dir": "/out/a", "resume": "auto",
    "model": {"name": "vit_demo", "depth": 2, "embed_dim": 32},
    "optim": {"lr": 0.002, "schedule": {"name": "warmup_linear_decay", "warmup_steps": 10}},
    "trainer": {"max_steps": 100, "global_batch_size": 256, "micro_batch_size": 128, "log_every": 10,
                "checkpoint_every": 50, "keep_checkpoints": 2, "activation_checkpointing": {"policy": "none"}},
    "data": {"train_shards": "/data/a/train-{000000..000011}.tar", "num_workers": 2, "shuffle_buffer": 1000},
    "deepspeed": {"zero_optimization": {"stage": 2}},
    "finetune": {"source": "models:/vit@best"},
    "tracking": {"enabled": True, "uri": "sqlite:///a.db"},
    "eval": {"every": 0, "batch_size": 128},
}


def changed(**dotted: object) -> dict:
    cfg = OmegaConf.create(BASE)
    for key, value in dotted.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    out = OmegaConf.to_container(cfg)
    assert isinstance(out, dict)
    return out


def test_keys_that_may_change_on_resume_are_not_differences() -> None:
    now = changed(trainer__max_steps=200, trainer__log_every=1, trainer__checkpoint_every=5,
                  trainer__micro_batch_size=64, eval__batch_size=64, data__num_workers=0,
                  data__train_shards="/moved/train-{000000..000011}.tar", output_dir="/new", name="b",
                  tracking__uri="http://mlflow:5000", tracking__enabled=False, resume="/out/a/checkpoints",
                  trainer__activation_checkpointing__policy="torch")
    assert ckpt.differing_keys(BASE, now) == []


def test_everything_else_is_a_difference_named_by_its_key() -> None:
    now = changed(optim__lr=0.1, model__depth=3, deepspeed__zero_optimization__stage=3, seed=1,
                  trainer__global_batch_size=512, data__shuffle_buffer=10, finetune__source="models:/other@best")
    assert ckpt.differing_keys(BASE, now) == [
        "data.shuffle_buffer", "deepspeed.zero_optimization.stage", "finetune.source", "model.depth",
        "optim.lr", "seed", "trainer.global_batch_size"]
    added = changed()
    added["model"]["qk_norm"] = True
    assert ckpt.differing_keys(BASE, added) == ["model.qk_norm"]  # a key on one side only


def _trainer(tmp_path: Path, resume: str, saved: dict | None, current: dict) -> tuple[Trainer, ckpt.CheckpointRef]:
    tag = tmp_path / "checkpoints" / "step_00000050"
    tag.mkdir(parents=True)
    if saved is not None:
        (tag / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    # Only the comparison is under test: a Trainer shell, without a process group or an engine.
    trainer = Trainer.__new__(Trainer)
    trainer.job = SimpleNamespace(resume=resume, record={**current, "resume": resume,  # type: ignore[assignment]
                                                         "output_dir": str(tmp_path)})
    trainer.output_dir = tmp_path
    trainer.dist = SimpleNamespace(is_main=True, rank=0, world_size=1)  # type: ignore[assignment]
    return trainer, ckpt.CheckpointRef(tag.parent, tag.name)


def test_resume_auto_refuses_with_one_line_naming_keys_and_ways_out(tmp_path: Path) -> None:
    trainer, ref = _trainer(tmp_path, "auto", BASE, changed(optim__lr=0.1))
    with pytest.raises(ConfigError) as err:  # train.py: ConfigError -> one line, exit 2
        trainer._check_resume_config(ref)
    line = str(err.value)
    assert "\n" not in line and isinstance(err.value, ckpt.CheckpointError)
    assert f"checkpoint {ref.path} was written by a run whose config differs in optim.lr (0.002 -> 0.1)" in line
    assert "resume=null" in line and f"new output_dir (currently {tmp_path})" in line


def test_explicit_resume_path_warns_and_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, ref = _trainer(tmp_path, str(tmp_path / "checkpoints"), BASE, changed(optim__lr=0.1))
    with caplog.at_level(logging.WARNING, logger="vitscale"):
        trainer._check_resume_config(ref)
    assert any("different config: optim.lr (0.002 -> 0.1)" in r.getMessage() for r in caplog.records)


def test_checkpoint_without_stored_config_is_not_compared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, ref = _trainer(tmp_path, "auto", None, changed(optim__lr=0.1))
    with caplog.at_level(logging.WARNING, logger="vitscale"):
        trainer._check_resume_config(ref)
    assert any("config not compared" in r.getMessage() for r in caplog.records)


def test_same_config_resumes_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, ref = _trainer(tmp_path, "auto", {**BASE, "output_dir": str(tmp_path)}, changed(trainer__max_steps=500))
    with caplog.at_level(logging.WARNING, logger="vitscale"):
        trainer._check_resume_config(ref)
    assert not caplog.records
