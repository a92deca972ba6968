"""The console (issue #16): evaluation and consolidation progress, dependency noise hidden, VITSCALE_VERBOSE.

Fast units in-process; one short 2-rank training under torchrun checks the whole console end to end.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vitscale import console
from vitscale.engine.distributed import destroy_group
from vitscale.eval.topk import EvalProgress, evaluate_topk
from tiny_runs import TINY_VIT_RUN  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What the console must no longer show (each hidden by vitscale/console.py or the export's logging).
NOISE = [
    "Setting accelerator to CPU",  # DeepSpeed, at import, in every rank
    "Attempting to get learning rate from scheduler before it has started",
    "is deprecated. Please use `torch.distributed",  # torch FutureWarning on DeepSpeed's collectives
    "compilers.C.base",  # DeepSpeed op builders probing gcc
    "deepspeed_shm_comm_op built successfully",
    "Processing zero checkpoint", "Loading checkpoint shards", "Reconstructed fp32 state dict",  # zero_to_fp32
]


# ------------------------------------------------------------------------------------ evaluation progress
class _Loader:
    """An EvalLoader stand-in: batches of logits (forward is the identity) and `expected` like the real one."""

    def __init__(self, batches: int, size: int, expected: int | None) -> None:
        self.batches, self.size, self.expected = batches, size, expected

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.batches):
            yield {"image": torch.randn(self.size, 10), "label": torch.randint(0, 10, (self.size,))}


def test_eval_progress_line_per_batch_when_interval_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vitscale.eval.topk"):
        evaluate_topk(lambda x: x, _Loader(4, 8, expected=32), topk=(1,), progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitscale.eval.topk"]
    assert [line.split(" images")[0] for line in lines[:4]] == ["eval: 8/32", "eval: 16/32", "eval: 24/32", "eval: 32/32"]
    assert "(25 %)" in lines[0] and "img/s, ETA" in lines[0]
    assert lines[-1].startswith("eval: done, 32 images in ")


def test_short_eval_prints_nothing_extra(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vitscale.eval.topk"):
        evaluate_topk(lambda x: x, _Loader(3, 4, expected=12), topk=(1,))  # default: every 30 s
    assert not [r for r in caplog.records if r.name == "vitscale.eval.topk"]


def test_eval_progress_format_and_scaling(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("test_console.progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        p = EvalProgress(30, total=50_000, logger=logger, clock=lambda: now[0])
        now[0] = 10.0
        p.update(20_000)  # under 30 s: nothing
        now[0] = 40.0
        p.update(12_800 * 3)
        two = EvalProgress(30, total=25_000, world_size=2, logger=logger, clock=lambda: now[0])
        now[0] = 70.0
        two.update(10_000)
        unknown = EvalProgress(0, total=None, logger=logger, clock=lambda: now[0])
        unknown.update(5)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "eval: 38,400/50,000 images (77 %), 960 img/s, ETA 12 s"
    assert msgs[1] == "eval: ~20,000/~50,000 images (40 %), ~666 img/s, ETA 45 s"  # rank 0's count x 2 ranks
    assert msgs[2].startswith("eval: 5 images, ") and "ETA" not in msgs[2]


# ------------------------------------------------------------------------------------ consolidation
@pytest.fixture()
def zero2_checkpoint(tmp_path: Path) -> Iterator[tuple[Path, torch.nn.Module]]:
    """A real DeepSpeed ZeRO-2 checkpoint of a tiny model, from a process group of one (gloo)."""
    import deepspeed
    import torch.distributed as dist

    saved = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        engine, *_ = deepspeed.initialize(model=model, dist_init_required=False, config={
            "train_batch_size": 2, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True})
        engine.backward(engine(torch.randn(2, 6)).sum())
        engine.step()
        engine.save_checkpoint(str(tmp_path / "checkpoints"), tag="step_00000001")
        yield tmp_path / "checkpoints", engine.module
    finally:
        destroy_group()  # through DeepSpeed: its cached world group must not outlive this group
        os.environ.clear()
        os.environ.update(saved)


def test_consolidation_logs_start_progress_and_end(zero2_checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from vitscale.engine import checkpoint as ckpt

    root, module = zero2_checkpoint
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="vitscale.engine.checkpoint"):
        state = ckpt.consolidated_state_dict(ckpt.CheckpointRef(root, "step_00000001"), zero_stage=2, module=module,
                                             progress_every_s=0)
        ckpt.export(state, tmp_path / "export", model_config={"n": 1})
    msgs = [r.getMessage() for r in caplog.records if r.name == "vitscale.engine.checkpoint"]
    assert msgs[0].startswith(f"export: consolidating step_00000001 from {root} (ZeRO-2, 1 rank files)")
    assert any(m.startswith("export: loading checkpoint shards 1/1 (") for m in msgs)  # DeepSpeed's per-file loop
    assert any(m.startswith("export: 53 parameters in 4 tensors (0.0 MB fp32) consolidated in ") for m in msgs)
    assert msgs[-1].startswith(f"export: wrote {tmp_path / 'export' / 'model.safetensors'} (53 parameters, ")
    out = capsys.readouterr()
    assert not [n for n in NOISE if n in out.out + out.err]  # DeepSpeed's prints and tqdm bars stayed off


# ------------------------------------------------------------------------------------ filters (in-process)
def test_deepspeed_filter_hides_named_noise_and_other_ranks() -> None:
    def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", level, "x.py", 1, msg, None, None)

    rank0, rank1 = console.DeepSpeedFilter(0), console.DeepSpeedFilter(1)
    before = sum(console.hidden.values())
    assert not rank0.filter(record("Attempting to get learning rate from scheduler before it has started"))
    assert rank0.filter(record("total_num_steps 4 is less than warmup_num_steps 100"))  # not listed: kept
    assert not rank1.filter(record("total_num_steps 4 is less than warmup_num_steps 100"))  # rank 0 says it
    assert rank1.filter(record("something broke", logging.ERROR))
    assert sum(console.hidden.values()) == before + 2
    quiet1 = console.ConsoleFilter(1)
    info = logging.LogRecord("vitscale.engine.distributed", logging.INFO, "x.py", 1, "rank 1/2", None, None)
    warn = logging.LogRecord("vitscale.engine.loop", logging.WARNING, "x.py", 1, "nan", None, None)
    probe = logging.LogRecord("compilers.C.base", logging.INFO, "x.py", 1, "gcc ...", None, None)
    assert not quiet1.filter(info) and quiet1.filter(warn)
    assert console.ConsoleFilter(0).filter(info) and not console.ConsoleFilter(0).filter(probe)


def test_only_listed_warnings_are_hidden() -> None:
    shown: list[str] = []
    show = console._show_warning(lambda message, category, *args: shown.append(f"{category.__name__}: {message}"))
    show(FutureWarning("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ..."), FutureWarning,
         "c10d_logger.py", 83)
    show(FutureWarning("`foo` is deprecated"), FutureWarning, "user.py", 1)
    show(UserWarning("`torch.distributed.reduce_scatter_tensor` is deprecated"), UserWarning, "x.py", 1)  # other class
    assert shown == ["FutureWarning: `foo` is deprecated",
                     "UserWarning: `torch.distributed.reduce_scatter_tensor` is deprecated"]


_IMPORT_DEEPSPEED = ("from vitscale.console import setup_console; setup_console(); import deepspeed; "
                     "from vitscale.console import summary; print(summary())")


def test_verbose_env_shows_the_dependency_output_again() -> None:
    """VITSCALE_VERBOSE=1: setup_console does nothing (the run above checks the warning is hidden without it)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env |= {"VITSCALE_VERBOSE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_DEEPSPEED], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    if console._cpu_only_machine():
        assert "Setting accelerator to CPU" in proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("None")  # nothing hidden


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> list[str]:
    from dist_scripts.fmnist_shards import write_shards  # tests/ is on sys.path (rootdir conftest)

    train, val = write_shards(tmp_path_factory.mktemp("fmnist"), n_train=128, n_val=64, per_shard=32,
                              src=fashion_mnist)
    return [f"data.train_shards='{train}'", f"data.val_shards='{val}'"]


def test_short_training_console_has_progress_and_no_noise(shards: list[str], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "vitscale" / "train.py"), f"output_dir={tmp_path / 'run'}", *shards,
           *TINY_VIT_RUN, "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
           "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.max_steps=2", "trainer.log_every=1",
           "trainer.checkpoint_every=2", "deepspeed=zero2", "tracking.enabled=false", "tracking.figures=false",
           "data.num_workers=0", "eval.batch_size=32", "trainer.precision=fp32"]
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "VITSCALE_VERBOSE")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    (tmp_path / "console.log").write_text(text)
    assert proc.returncode == 0, text[-4000:]
    assert "step 1/2" in text and "step 2/2" in text
    assert "export: consolidating step_00000002" in text and "consolidated in" in text
    assert "eval: {'eval/top1'" in text or "step 2 eval:" in text
    assert "rank 0/2" in text and "rank 1/2" not in text  # rank 1 is quiet below WARNING
    assert "dependency lines hidden on this rank" in text
    found = [n for n in NOISE if n in text]
    assert not found, f"noise on the console: {found}\n{text[-4000:]}"
