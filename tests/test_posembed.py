"""Position-embedding resampling: equal to timm's, prefix tokens kept, automatic on load."""
from __future__ import annotations


import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitscale.models import create_model, resample_pos_embed


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("old, new, prefix", [((7, 7), (12, 12), 1), ((14, 14), (10, 10), 1), ((6, 6), (4, 9), 0),
                                              ((3, 5), (6, 10), 1)])
@pytest.mark.parametrize("mode, antialias", [("bicubic", True), ("bilinear", False)])
def test_equals_timm(old: tuple, new: tuple, prefix: int, mode: str, antialias: bool) -> None:
    torch.manual_seed(0)
    table = torch.randn(1, prefix + old[0] * old[1], 16)
    kwargs = {} if (mode, antialias) == ("bicubic", True) else dict(mode=mode, antialias=antialias)
    ours = resample_pos_embed(table, new, num_prefix_tokens=prefix, old_grid=old, **kwargs)
    theirs = resample_abs_pos_embed(table, list(new), old_size=list(old), num_prefix_tokens=prefix,
                                    interpolation=mode, antialias=antialias)
    assert ours.shape == (1, prefix + new[0] * new[1], 16)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:, :prefix], table[:, :prefix], atol=0, rtol=0)


def test_default_is_timm_default_and_jax_variant_differs() -> None:
    table = torch.randn(1, 1 + 49, 8)
    default = resample_pos_embed(table, (10, 10))
    torch.testing.assert_close(default, resample_abs_pos_embed(table, [10, 10]), atol=1e-6, rtol=0)
    jax_style = resample_pos_embed(table, (10, 10), mode="bilinear", antialias=False)
    assert (default - jax_style).abs().max() > 1e-3


def test_same_grid_is_identity_and_dtype_is_kept() -> None:
    table = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(table, (4, 4)) is table
    bf16 = resample_pos_embed(table.bfloat16(), (6, 6))
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, 37, 8)


def test_non_square_table_needs_its_grid() -> None:
    with pytest.raises(ValueError, match=r"cannot infer the patch grid .* 15 patch tokens"):
        resample_pos_embed(torch.randn(1, 16, 8), (4, 4))
    with pytest.raises(ValueError, match=r"old_grid \(4, 4\) does not hold the 15 patch tokens"):
        resample_pos_embed(torch.randn(1, 16, 8), (4, 4), old_grid=(4, 4))


@pytest.mark.parametrize("img_size", [56, (28, 56)])
def test_load_state_dict_resamples_pos_embed(img_size) -> None:
    small = create_model("vit_tiny_test", img_size=28, patch_size=7)
    big = create_model("vit_tiny_test", img_size=img_size, patch_size=7)
    big.load_state_dict(small.state_dict())
    expected = resample_pos_embed(small.pos_embed.detach(), big.grid_size)
    torch.testing.assert_close(big.pos_embed.detach(), expected, atol=0, rtol=0)
    torch.testing.assert_close(big.blocks[1].mlp.fc2.weight, small.blocks[1].mlp.fc2.weight)
    assert big(torch.randn(1, 3, *big.cfg.img_hw)).shape == (1, 10)


def test_resampling_also_happens_inside_a_wrapper() -> None:
    # DeepSpeed / DDP call the wrapper's load_state_dict, not the ViT's: the load hook still fires.
    small = torch.nn.Sequential(create_model("vit_tiny_test", img_size=28, patch_size=7))
    big = torch.nn.Sequential(create_model("vit_tiny_test", img_size=42, patch_size=7))
    big.load_state_dict(small.state_dict())
    assert big[0].pos_embed.shape == (1, 37, 64)
    expected = resample_pos_embed(small[0].pos_embed.detach(), (6, 6))
    torch.testing.assert_close(big[0].pos_embed.detach(), expected, atol=0, rtol=0)


def test_incompatible_pos_embed_is_a_clear_error() -> None:
    model = create_model("vit_tiny_test")
    sd = model.state_dict()
    sd["pos_embed"] = torch.zeros(1, 17, 32)
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint shape \(1, 17, 32\) cannot be resampled"):
        model.load_state_dict(sd)
