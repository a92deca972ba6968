"""vitscale.config.validate: one line naming the key, the value and what was expected; exit 2 at the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vitscale.config import ConfigError, JobConfig, validate

REPO = Path(__file__).resolve().parents[1]
SHARDS = "data.train_shards='/shards/train-{000000..000003}.tar'"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_every_experiment_validates_and_is_typed() -> None:
    for exp in sorted((REPO / "configs" / "experiment").glob("*.yaml")):
        run = validate(_compose(f"+experiment={exp.stem}", SHARDS), world_size=1)
        assert isinstance(run, JobConfig) and isinstance(run.trainer.max_steps, int) and run.model.embed_dim > 0
        assert isinstance(run.optim.lr, float) and run.trainer.activation_checkpointing.every >= 1


@pytest.mark.parametrize("overrides, world, message", [
    ((), 1, r"^data.train_shards is not set"),
    ((SHARDS, "trainer.global_batch_size=100", "trainer.micro_batch_size=32"), 2,
     r"^trainer.global_batch_size=100: not divisible by trainer.micro_batch_size \(32\) x world size \(2\) = 64$"),
    ((SHARDS, "tracking.register_every=3", "trainer.checkpoint_every=2"), 1,
     r"^tracking.register_every=3: expected a multiple of trainer.checkpoint_every=2"),
    ((SHARDS, "trainer.max_steps=ten"), 1, r"^trainer.max_steps: Value 'ten' of type 'str' could not be converted"),
    ((SHARDS, "trainer.precision=fp8"), 1, r"^trainer.precision='fp8': expected one of auto, fp32, bf16, fp16$"),
    ((SHARDS, "trainer.compile=yes"), 1, r"^trainer.compile='yes': expected one of none, blocks, model$"),
    ((SHARDS, "trainer.log_every=0"), 1, r"^trainer.log_every=0: expected >= 1$"),
    ((SHARDS, "model.patch_size=5"), 1, r"^model 'vit_b16': img_size 224 is not divisible by patch_size 5"),
    ((SHARDS, "data.num_workers=-1"), 1, r"^data.num_workers"),
    ((SHARDS, "finetune.posemb_resize=nearest"), 1, r"^finetune.posemb_resize='nearest': expected one of timm, jax$"),
])
def test_each_mistake_is_one_line_naming_the_key(overrides: tuple[str, ...], world: int, message: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGENET_TRAIN_SHARDS", raising=False)
    with pytest.raises(ConfigError, match=message) as err:
        validate(_compose(*overrides), world_size=world)
    assert "\n" not in str(err.value)


def test_unknown_keys_are_refused_by_hydra_before_validation() -> None:
    with pytest.raises(Exception, match="max_step"):
        _compose(SHARDS, "trainer.max_step=10")


def test_train_py_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "vitscale" / "train.py"), SHARDS, f"output_dir={tmp_path}",
                           "trainer.global_batch_size=33", "tracking.enabled=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "trainer.global_batch_size=33: not divisible" in out and "Traceback" not in out


def test_model_sizes_have_one_home_the_registry() -> None:
    """configs/model/_base.yaml lists exactly the overridable fields (null = the registry's value); a
    model file names a variant and sets only what differs from the registry's entry."""
    import yaml

    from vitscale.models.registry import OVERRIDABLE, model_config

    base = yaml.safe_load((REPO / "configs" / "model" / "_base.yaml").read_text())
    assert set(base) == {"name"} | set(OVERRIDABLE) - {"num_classes"}
    assert all(v is None for k, v in base.items() if k != "name")
    for path in sorted((REPO / "configs" / "model").glob("[!_]*.yaml")):
        own = yaml.safe_load(path.read_text())
        assert own["defaults"] == ["_base", "_self_"], path.name
        registry = model_config(own["name"]).to_dict()
        repeated = [k for k, v in own.items() if k not in ("defaults", "name") and registry.get(k) == v]
        assert not repeated, f"{path.name} repeats the registry's {repeated}"
    job = validate(_compose("+experiment=vit_h14_jft", SHARDS), world_size=1)
    assert (job.model.embed_dim, job.model.depth, job.model.num_heads, job.model.patch_size) == (1280, 32, 16, 14)
    assert job.record["model"]["embed_dim"] == 1280  # what checkpoints store and the tracker logs


def test_a_model_override_reaches_the_typed_config() -> None:
    job = validate(_compose("model=vit_b16", "model.img_size=384", "model.drop_path=0.1", SHARDS), world_size=1)
    assert (job.model.img_size, job.model.drop_path, job.model.embed_dim) == (384, 0.1, 768)
    with pytest.raises(ConfigError, match=r"^model 'vit_b16': img_size 100 is not divisible by patch_size 16$"):
        validate(_compose("model=vit_b16", "model.img_size=100", SHARDS))
