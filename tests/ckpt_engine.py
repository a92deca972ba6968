"""A real DeepSpeed engine in the test process (a process group of one, gloo) for checkpoint tests.

Built by vitscale's own Trainer (vitscale.start.build_trainer, no shard stream) from the demo experiment shrunk to a 1-block, width-32 ViT at
14 px, so checkpoints are DeepSpeed's real files (ZeRO partitions, LossScaler, ...) yet take
milliseconds to write. The environment variables a process group of one sets (RANK, MASTER_PORT,
...) are restored when the fixture ends, and the group is destroyed, so later tests see neither.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tiny_runs import TINY_VIT_RUN  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(output_dir: Path, stage: int = 2, *extra: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[
            *TINY_VIT_RUN, f"deepspeed=zero{stage}", "model.depth=1", "model.embed_dim=32",
            "model.num_heads=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
            "trainer.precision=fp32", "tracking.enabled=false", f"output_dir={output_dir}",
            "data.train_shards=unused", "trainer.peak_flops=1e12", *extra])


@contextmanager
def engine_in_process(output_dir: Path, stage: int = 2) -> Iterator[Any]:
    """A Trainer whose ``engine`` has taken one optimizer step (so optimizer states exist)."""
    import torch.distributed as dist

    from vitscale.engine.distributed import destroy_group
    from vitscale.start import build_trainer

    saved = dict(os.environ)
    threads = torch.get_num_threads()
    try:  # no shard stream: the test steps the engine itself
        trainer = build_trainer(tiny_cfg(output_dir, stage, "resume=null"), batches=())
        step(trainer)
        yield trainer
    finally:
        if dist.is_initialized():
            destroy_group()  # DeepSpeed drops its cached groups too
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


def step(trainer: Any) -> None:
    """One forward/backward/step on random 14 px images."""
    engine = trainer.engine
    loss = engine(torch.randn(4, 1, 14, 14)).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()


def save(trainer: Any, step_no: int, keep: int = 0) -> Any:
    from vitscale.engine import checkpoint as ckpt

    return ckpt.save(trainer.engine, trainer.output_dir / "checkpoints", step_no, rank=0,
                     client_state={"step": step_no}, rank_state={"rng": ckpt.rng_state(), "data": {"n": step_no}},
                     keep=keep)


class Payload:
    """Unpickling this writes ``marker``: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def plant_payload(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch file carrying a payload beside plausible content."""
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
