"""In-process engine pieces: activation checkpointing policies, schedules, loss, checkpoint files."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vitscale.config import ScheduleConfig
from vitscale.engine import checkpoint as ckpt
from vitscale.engine.activation import POLICIES, apply_policy
from vitscale.engine.build import build_loss
from vitscale.engine.metrics import StepTimer, matmul_probe_flops
from vitscale.engine.schedule import scheduler_config
from vitscale.models import create_model


def _grads(policy: str, every: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", img_size=28, patch_size=7, in_chans=1, depth=3, dropout=0.1,
                         drop_path=0.1)
    apply_policy(model, policy, every)
    model.train()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    torch.manual_seed(1)  # identical dropout masks for every policy (recompute must replay them)
    loss = model(x).logsumexp(-1).sum()
    loss.backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_activation_checkpointing_gives_the_same_gradients(policy: str) -> None:
    ref_x, ref = _grads("none", 1)
    x_grad, got = _grads(policy, 2)  # blocks 0 and 2 recomputed, block 1 not
    torch.testing.assert_close(x_grad, ref_x, rtol=0, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_unknown_policy_is_a_clear_error() -> None:
    model = create_model("vit_tiny_test")
    with pytest.raises(ValueError, match="activation_checkpointing.policy='selective'"):
        apply_policy(model, "selective", 1)


def test_schedules_follow_the_paper_shapes() -> None:
    """Through DeepSpeed's own scheduler classes: linear warm-up to the base LR, then linear to 0."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    block = scheduler_config(ScheduleConfig(name="warmup_linear_decay", warmup_steps=10), 0.5, 110)
    sched = WarmupDecayLR(opt, **block["params"])
    lrs = []
    for _ in range(111):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    # lrs[t] is the LR at scheduler iteration t (DeepSpeed starts at iteration 0 with LR 0).
    assert lrs[5] == pytest.approx(0.25) and lrs[10] == pytest.approx(0.5)  # half-way, then the top
    assert lrs[60] == pytest.approx(0.25) and lrs[110] == pytest.approx(0.0)
    block = scheduler_config(ScheduleConfig(name="warmup_cosine", warmup_steps=10, min_lr_ratio=0.0), 0.5, 110)
    opt.param_groups[0]["lr"] = 0.5
    cos = WarmupCosineLR(opt, **block["params"])
    for _ in range(60):
        cos.step()
    assert cos.get_last_lr()[0] == pytest.approx(0.25, abs=0.01)  # half-way through the cosine
    assert scheduler_config(ScheduleConfig(name="constant", warmup_steps=0), 0.5, 10) is None


def test_losses_accept_hard_and_soft_labels() -> None:
    logits = torch.randn(3, 5)
    hard = torch.tensor([0, 3, 4])
    soft = torch.nn.functional.one_hot(hard, 5).float()
    for name in ("softmax_xent", "sigmoid_xent"):
        fn = build_loss(name)
        torch.testing.assert_close(fn(logits, hard), fn(logits, soft))
    assert build_loss("sigmoid_xent")(logits, hard) == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="sum").item() / 3, rel=1e-6)


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_resolution(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert ckpt.resolve("auto", out) is None  # fresh start
    root = out / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert ckpt.resolve("auto", out) is None  # no rank files: the save never completed
    (root / "step_00000004" / "rank_0.pt").write_bytes(b"")
    (root / "latest").write_text("step_00000004")  # a checkpoint from before manifests: loaded unverified
    assert ckpt.resolve("auto", out) == ckpt.CheckpointRef(root, "step_00000004")
    assert ckpt.resolve(str(root / "step_00000004"), out) == ckpt.CheckpointRef(root, "step_00000004")
    assert ckpt.resolve(None, out) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve(str(tmp_path / "missing"), out)


def test_export_is_loadable_by_create_model(tmp_path: Path) -> None:
    model = create_model("vit_tiny_test")
    ckpt.export(model.state_dict(), tmp_path, model_config=dict(model.config), train_config_yaml="a: 1\n")
    state, config = ckpt.load_export(tmp_path)
    again = create_model(**config)
    again.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x))
    assert json.loads((tmp_path / "model_config.json").read_text())["name"] == "vit_tiny_test"


def test_throughput_and_mfu_arithmetic() -> None:
    timer = StepTimer()
    timer.add(data_s=0.5, images=8)
    out = timer.summary(world_size=2, tokens_per_image=17, flops_per_image=1e9, peak=12e9, now=timer.start + 2.0)
    assert out["images_per_s"] == pytest.approx(8.0)  # 16 images over 2 s
    assert out["tokens_per_s"] == pytest.approx(8.0 * 17)
    assert out["mfu"] == pytest.approx(3 * 1e9 * 8 / 2.0 / 12e9)
    assert out["data_wait_s"] == pytest.approx(0.5) and out["compute_s"] == pytest.approx(1.5)
    assert matmul_probe_flops(n=256, repeats=2) > 1e8  # any CPU does > 0.1 GFLOP/s


def test_split_cpu_threads_shares_cores_between_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscale.engine.distributed import split_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert split_cpu_threads(2) == 4 and torch.get_num_threads() == 4
        assert split_cpu_threads(16) == 1 and torch.get_num_threads() == 1
        assert split_cpu_threads(1) is None  # a lone process keeps torch's default
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(before)
        assert split_cpu_threads(2) is None and torch.get_num_threads() == before  # the user's choice wins
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["timm", "jax"])
def test_finetune_posemb_resize_is_the_configured_one(tmp_path: Path, mode: str) -> None:
    """finetune.posemb_resize reaches the model's load-time resample; the source's numerics travel."""
    from vitscale.start import model_for
    from vitscale.models.posembed import resample_pos_embed

    source = create_model("vit_ti16", img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32,
                          depth=1, num_heads=2, mlp_act="gelu_tanh")
    torch.nn.init.normal_(source.pos_embed)
    ckpt.export(source.state_dict(), tmp_path / "src", model_config=dict(source.config))
    cfg = OmegaConf.create({
        "model": {**{k: v for k, v in source.config.items() if k not in ("mlp_act", "num_classes")},
                  "img_size": 24},
        "data": {"num_classes": 5},
        "finetune": {"source": str(tmp_path / "src"), "num_classes": 5, "head_zero_init": True,
                     "posemb_resize": mode},
        "tracking": {"uri": None},
    })
    model, _ = model_for(cfg)
    assert model.config["posemb_resize"] == mode and model.config["mlp_act"] == "gelu_tanh"
    expected = resample_pos_embed(source.pos_embed.detach(), (6, 6), num_prefix_tokens=1, mode=mode)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    other = resample_pos_embed(source.pos_embed.detach(), (6, 6), num_prefix_tokens=1,
                               mode="jax" if mode == "timm" else "timm")
    assert not torch.allclose(model.pos_embed.detach(), other, atol=1e-4)


def test_mfu_peak_comes_from_the_hardware_table_and_unknown_gpus_warn(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from vitscale.engine.metrics import peak_flops
    from vitscale.hardware import get_gpu

    cuda = torch.device("cuda", 0)  # only its type is read; the name comes from the patched query
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, "bf16") == get_gpu("h100-pcie").bf16 < get_gpu("h100-80gb").bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(cuda, "bf16") == pytest.approx(989e12, rel=0.01)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    with caplog.at_level("WARNING"):
        assert peak_flops(cuda, "bf16") == 0.0
    assert "trainer.peak_flops" in caplog.text and "Imaginary GPU 9000" in caplog.text


def test_progress_line_has_what_a_console_reader_needs() -> None:
    from vitscale.engine.metrics import progress_line

    record = {"step": 100, "loss": 1.23456, "lr": 1e-3, "images_per_s": 2345.6, "mfu": 0.123,
              "data_wait_s": 0.01, "compute_s": 0.09, "peak_mem": 3 * 2**30}
    line = progress_line(record, max_steps=36100)
    assert line == ("step 100/36100 | loss 1.2346 | lr 1.00e-03 | 2,346 img/s | MFU 12.3% | data wait 10% | "
                    "mem 3.00 GiB | ETA 1:00:00")


def test_cpu_thread_plan_gives_workers_cores_only_when_ranks_keep_two_threads() -> None:
    from vitscale.cpu_threads import plan_cpu_threads

    # The 2-core demo: 2 ranks x 1 thread, their 2 workers time-slice (reserving would leave 0).
    plan = plan_cpu_threads(2, 1, cores=2, env={})
    assert (plan.torch_threads, plan.user_set) == (1, False)
    assert plan.line() == ("CPU threads: 2 cores, 2 local ranks x 1 torch threads, 1 loader workers x 1 thread "
                           "at nice 19 (they share cores with the ranks)")
    assert plan_cpu_threads(1, 1, cores=2, env={}).torch_threads == 2  # a lone rank keeps both cores
    assert plan_cpu_threads(2, 1, cores=4, env={}).torch_threads == 2  # reserving would leave 1 per rank
    assert plan_cpu_threads(2, 1, cores=8, env={}).torch_threads == 3  # (8 - 2 workers) // 2 ranks
    # Workers run at the lowest priority exactly when they time-slice with ranks.
    assert plan_cpu_threads(1, 1, cores=2, env={}).worker_nice == 19
    assert plan_cpu_threads(2, 1, cores=8, env={}).worker_nice == 0  # a core each, nothing to yield to
    assert plan_cpu_threads(2, 0, cores=2, env={}).worker_nice == 0
    assert plan_cpu_threads(2, 1, cores=8, env={"OMP_NUM_THREADS": "4"}).worker_nice == 19  # user filled the cores
    assert plan_cpu_threads(8, 4, cores=16, env={}).torch_threads == 2  # 32 workers cannot have cores
    assert plan_cpu_threads(2, 0, cores=8, env={}).torch_threads == 4
    assert plan_cpu_threads(4, 2, cores=2, env={}).torch_threads == 1  # never 0
    user = plan_cpu_threads(2, 1, cores=8, env={"OMP_NUM_THREADS": "5"})
    assert (user.torch_threads, user.user_set) == (5, True) and "(OMP_NUM_THREADS)" in user.line()


def test_loader_call_sets_rank_threads_logs_once_and_caps_workers(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from vitscale import cpu_threads as threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(threads, "_inits", {})
        nice = os.nice(0)
        with caplog.at_level("INFO", logger="vitscale.cpu_threads"):
            init = threads.cpu_loader_worker_init(1, torch.device("cpu"))
            assert threads.cpu_loader_worker_init(1, torch.device("cpu")) is init
        assert torch.get_num_threads() == 3
        assert caplog.text.count("CPU threads: 8 cores, 2 local ranks x 3 torch threads, 1 loader workers x 1 thread") == 1
        assert threads.cpu_loader_worker_init(0, torch.device("cpu")) is None  # no workers, no init
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
            monkeypatch.delenv(var, raising=False)  # restored by monkeypatch after init sets them
        assert init is not None
        init(0)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert os.nice(0) == nice  # 8 cores, 2 x (3 + 1): nothing shared, no niceness (it would be this process's)
    finally:
        torch.set_num_threads(before)


class _Niceness(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.nice(0)


def test_workers_that_share_cores_with_ranks_run_at_the_lowest_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscale import cpu_threads as threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        monkeypatch.setattr(threads, "_inits", {})
        init = threads.cpu_loader_worker_init(1, torch.device("cpu"))  # the 2-core demo's split
        loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1, worker_init_fn=init)
        assert list(loader) == [min(os.nice(0) + 19, 19)]  # the worker's niceness; this process keeps its own
    finally:
        torch.set_num_threads(before)


def test_a_group_of_one_needs_no_rendezvous_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from vitscale.engine.distributed import init_distributed, teardown

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME"):
        monkeypatch.setenv(var, "x")  # registered for restoring, then removed for the call
        monkeypatch.delenv(var)
    before = torch.get_num_threads()
    info = init_distributed(timeout_s=60)
    try:
        assert (info.launcher, info.world_size) == ("single", 1) and "MASTER_PORT" not in os.environ
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    finally:
        teardown(info)
        torch.set_num_threads(before)


def test_finetune_takes_the_architecture_from_its_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """finetune_384 composes ViT-B/16; a ViT of another size as the source is what gets fine-tuned."""
    from vitscale.start import model_for

    source = create_model("vit_ti16", img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32,
                          depth=1, num_heads=2)
    ckpt.export(source.state_dict(), tmp_path / "src", model_config=dict(source.config))

    def cfg(**model: Any) -> Any:
        return OmegaConf.create({
            "model": {"name": "vit_b16", "img_size": 32, "in_chans": 1, "patch_size": 16, "embed_dim": 768,
                      "depth": 12, "num_heads": 12, "dropout": 0.1, **model},
            "data": {"num_classes": 5}, "tracking": {"uri": None},
            "finetune": {"source": str(tmp_path / "src"), "num_classes": 5, "head_zero_init": True}})

    with caplog.at_level("INFO"):
        model, _ = model_for(cfg())
    c = model.config
    assert (c["embed_dim"], c["depth"], c["num_heads"], c["patch_size"]) == (32, 1, 2, 4)
    assert (c["img_size"], c["dropout"], c["num_classes"]) == (32, 0.1, 5)  # the fine-tune's own choices
    assert "architecture from the source" in caplog.text and "model.embed_dim=768" in caplog.text
    with pytest.raises(ValueError, match=r"takes 1-channel images but model.in_chans=3"):
        model_for(cfg(in_chans=3))


def test_a_trainer_is_built_whole_or_not_at_all(tmp_path: Path) -> None:
    """Everything is built in __init__ (no half-built Trainer with `assert x is not None`): a failure
    there tears down the process group it created, and a built Trainer has every attribute fit() uses."""
    import os

    import torch.distributed as dist

    from ckpt_engine import tiny_cfg  # tests/ is on sys.path
    from vitscale.engine.distributed import destroy_group
    from vitscale.start import build_trainer

    saved, threads = dict(os.environ), torch.get_num_threads()
    try:
        with pytest.raises(FileNotFoundError, match=r"resume=.*nowhere does not exist"):
            build_trainer(tiny_cfg(tmp_path, 2, f"resume={tmp_path / 'nowhere'}"), batches=())
        assert not dist.is_initialized()
        os.environ.clear()
        os.environ.update(saved)  # a group of one exported RANK / WORLD_SIZE: start as a fresh process would
        trainer = build_trainer(tiny_cfg(tmp_path, 2, "resume=null"), batches=iter([]))
        try:
            for name in ("engine", "optimizer", "ds_config", "loss_fn", "metrics_file", "tracker", "batches",
                         "resume_rng", "sample_images", "warned_unshared", "flops_per_image", "peak"):
                assert hasattr(trainer, name), name
            assert trainer.step == 0 and trainer.loader is None and trainer.accumulation == 1
        finally:
            destroy_group()  # DeepSpeed drops its cached groups too
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
