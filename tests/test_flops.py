"""Analytic MACs: against timm's published numbers and against PyTorch's own FLOP counter."""
from __future__ import annotations


import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.models import create_model, macs_per_image, model_config


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name, img_size, timm_gmacs", [
    ("vit_b16", 224, 17.58), ("vit_l16", 224, 61.6), ("vit_h14", 224, 167.4), ("r50_vit_b16", 384, 67.43),
])
def test_within_3_percent_of_timm_published_gmacs(name: str, img_size: int, timm_gmacs: float) -> None:
    macs = macs_per_image(model_config(name), img_size)
    assert macs / 1e9 == pytest.approx(timm_gmacs, rel=0.03)


@pytest.mark.parametrize("overrides", [
    dict(name="vit_tiny_test"),
    dict(name="vit_tiny_test", img_size=(32, 48), pool="gap", representation_size=48),
    dict(name="r50_vit_tiny_test", img_size=(40, 48)),  # odd feature-map sizes exercise SAME padding
    dict(name="r50_vit_tiny_test", stem_layers=(), patch_size=8),
])
def test_equals_torch_flop_counter(overrides: dict) -> None:
    # The math SDPA backend decomposes attention into matmuls the counter sees (the fused CPU kernel
    # is not counted by FlopCounterMode).
    model = create_model(**overrides).eval()
    x = torch.randn(1, model.cfg.in_chans, *model.cfg.img_hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    assert model.macs_per_image() == counter.get_total_flops() // 2


def test_img_size_argument_and_inputs() -> None:
    model = create_model("vit_tiny_test")
    assert macs_per_image(model) == macs_per_image(model.config) == model.macs_per_image(32)
    assert macs_per_image(model, 64) > 4 * macs_per_image(model)  # 4x tokens, attention is quadratic
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        macs_per_image(model, 36)
    with pytest.raises(TypeError, match="needs a vitscale model"):
        macs_per_image(torch.nn.Linear(2, 2))
