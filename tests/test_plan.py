"""The planner (`python -m vitscale.plan`): its memory model against what DeepSpeed and autograd
really allocate on CPU, its compute against the paper's Table 6, and its command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import validate_plan  # noqa: E402

from vitscale.hardware import get_gpu, known_gpus, match_device_name  # noqa: E402
from vitscale.plan.config import compose_config  # noqa: E402
from vitscale.plan.memory import activation_bytes, model_states, zero12_partition_overlap  # noqa: E402
from vitscale.plan.planner import make_plan, plan_summary  # noqa: E402


# ------------------------------------------------------------------------------ pure arithmetic
def test_zero12_partition_padding_and_overlap():
    padded, part, overlap = zero12_partition_overlap([5, 3, 10], world=2)
    assert (padded, part) == (20, 10)  # padded to a multiple of 2 x world
    assert overlap == [18, 10]  # rank 0's slice [0, 10) touches all three, rank 1's [10, 20) only the last


def test_model_states_per_element_bytes():
    psi = 1_000_000
    s0 = model_states([[psi]], stage=0, precision="bf16", world=8)
    assert (s0.params, s0.grads, s0.optim) == (2 * psi, 2 * psi, 12 * psi + 4)
    s3 = model_states([[psi]], stage=3, precision="bf16", world=8, zero={"stage": 3, "reduce_bucket_size": 0,
                                                                          "contiguous_gradients": False})
    per = psi // 8
    assert (s3.params, s3.grads, s3.optim) == (2 * per, 2 * per, 12 * per + 4)
    sgd = model_states([[psi]], stage=1, precision="fp32", world=2, optimizer="sgd", momentum=0.9)
    assert sgd.optim == 4 * psi // 2 + 4 * psi // 2  # master + momentum on the half slice


def test_activation_model_scales_with_batch_and_checkpointing():
    cfg = dict(name="t", img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0)
    one = activation_bytes(cfg, 1, precision="bf16")
    four = activation_bytes(cfg, 4, precision="bf16")
    assert four.stored == 4 * one.stored
    tokens, width = 257, 1280
    assert one.per_block >= 32 * tokens * width  # 16 D values x 2 bytes (+ LN stats + lse)
    ac1 = activation_bytes(cfg, 1, precision="bf16", ac_every=1)
    assert ac1.checkpointed_blocks == 32 and ac1.stored < one.stored / 10
    assert ac1.recompute_fraction == pytest.approx(1.0)


def test_gpu_table():
    assert get_gpu("H100").name == "h100-80gb"
    assert get_gpu("h100-80gb").peak("bf16") == pytest.approx(989.4e12)
    assert match_device_name("NVIDIA H100 80GB HBM3").name == "h100-80gb"
    assert match_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    with pytest.raises(ValueError, match="known: .*h100-80gb"):
        get_gpu("tpu-v9")
    assert "mi300x" in known_gpus()


# ----------------------------------------------------------------------------- against reality
@pytest.mark.parametrize("case", validate_plan.ACT_CASES, ids=[c[0] for c in validate_plan.ACT_CASES])
def test_activation_bytes_match_autograd(case):
    _, overrides, mb, precision, every, attention = case
    measured, predicted = validate_plan.measure_activations(overrides, mb, precision, every, attention)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_paper_table6_compute():
    for row in validate_plan.run_compute():
        assert abs(row["error"]) <= 0.03, row


def test_zero3_estimate_cross_check():
    r = validate_plan.run_zero3_cold()
    # Same partitioned bytes per parameter except DeepSpeed's estimate counts fp32 gradients (18 vs 16).
    assert r["ratio_per_param"] == pytest.approx(16 / 18, rel=0.01)


@pytest.mark.slow
def test_model_states_match_deepspeed_on_two_ranks():
    """One torchrun launch, ZeRO 0-3 x fp32/bf16, every rank: within 2 % (in practice a few bytes)."""
    rows = validate_plan.run_zero(timeout=900)
    assert len(rows) == 2 * len(validate_plan.ZERO_CASES)
    for r in rows:
        assert r["predicted_after_step"] == pytest.approx(r["measured_after_step"], rel=0.02), r
        assert r["predicted_end_backward"] == pytest.approx(r["measured_end_backward"], rel=0.02), r
        assert r["predicted_buffers"] == r["measured_buffers"], r


# ------------------------------------------------------------------------------------ the tool
def test_plan_h14_on_256_h100():
    cfg = compose_config(["+experiment=vit_h14_jft", "plan.gpu=h100-80gb", "plan.gpus=256"])
    plan = make_plan(cfg)
    rows = {(r["stage"], r["ac_every"]): r for r in plan["rows"]}
    assert set(rows) == {(s, k) for s in ("0", "1", "2", "3", "3o") for k in (0, 2, 1)}
    assert rows[("3", 1)]["configured"]
    assert plan["setting"]["tokens"] == 257
    # stage ordering of model states; checkpointing trades activations for compute
    assert rows[("0", 0)]["states"] > rows[("1", 0)]["states"] > rows[("3", 0)]["states"]
    assert rows[("3", 1)]["act_per_image"] < rows[("3", 2)]["act_per_image"] < rows[("3", 0)]["act_per_image"]
    assert rows[("3", 1)]["compute_s"] > rows[("3", 0)]["compute_s"]
    tot = plan["totals"]
    assert tot["steps"] == 1_036_000 and tot["epochs"] == pytest.approx(14.0, rel=1e-3)
    assert tot["train_flops"] / 1e18 == pytest.approx(4262, rel=0.03)
    assert tot["gpu_hours"] == pytest.approx(tot["wall_clock_hours"] * 256)


def test_plan_summary_is_flat_and_scalar():
    cfg = compose_config(["+experiment=vit_h14_jft"])
    summary = plan_summary(cfg, 64, gpu="a100-80gb")
    assert summary["plan/gpu"] == "a100-80gb" and summary["plan/gpus"] == 64
    assert summary["plan/zero_stage"] == "3" and summary["plan/ac_every"] == 1
    assert all(isinstance(v, (int, float, str)) for v in summary.values())
    assert summary["plan/accumulation"] == pytest.approx(4096 / (16 * 64))


def test_plan_summary_on_training_config_without_plan_section():
    cfg = compose_config(["+experiment=vit_b16_jft"], config_name="train")
    summary = plan_summary(cfg, 8, gpu="h100-80gb")
    assert summary["plan/zero_stage"] == "1" and summary["plan/micro_batch"] == 64


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitscale.plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_table_json_and_bad_input():
    out = _cli("+experiment=vit_l16_jft", "plan.gpus=16", "plan.stages=[2,3]", "plan.ac_every=[0,2]")
    assert out.returncode == 0, out.stderr
    assert "ZeRO" in out.stdout and "GPU-hours" in out.stdout and "*  2       2" in out.stdout
    js = _cli("+experiment=vit_l16_jft", "plan.gpus=16", "plan.stages=[2]", "--json")
    assert js.returncode == 0
    data = json.loads(js.stdout)
    assert {"setting", "rows", "totals"} <= set(data)
    bad = _cli("plan.gpu=tpu-v9")
    assert bad.returncode == 2 and "known:" in bad.stderr and "h100-80gb" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert _cli("plan.gpus=0").returncode == 2
