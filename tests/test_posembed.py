"""Position-embedding resampling: equal to timm's (default) or to the official JAX loaders'
scipy.ndimage.zoom (mode="jax"), prefix tokens kept, automatic on load with the model's mode."""
from __future__ import annotations


import numpy as np
import pytest
import scipy.ndimage
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
    assert torch.equal(resample_pos_embed(table, (10, 10), mode="timm"), default)
    jax_style = resample_pos_embed(table, (10, 10), mode="jax")
    assert (default - jax_style).abs().max() > 1e-3


@pytest.mark.parametrize("old, new, prefix", [((4, 4), (6, 6), 1), ((14, 14), (24, 24), 1), ((24, 24), (14, 14), 0),
                                              ((7, 7), (3, 3), 1), ((3, 5), (6, 10), 0), ((2, 2), (1, 1), 1)])
def test_jax_mode_equals_scipy_zoom(old: tuple, new: tuple, prefix: int) -> None:
    # The official loaders (vit_jax checkpoint.load_pretrained, big_vision vit.resample_posemb) call
    # scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1) on the (h, w, D) grid.
    table = torch.randn(1, prefix + old[0] * old[1], 16, generator=torch.Generator().manual_seed(0))
    ours = resample_pos_embed(table, new, num_prefix_tokens=prefix, old_grid=old, mode="jax")
    grid = table[0, prefix:].numpy().reshape(*old, 16)
    zoomed = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert zoomed.shape == (*new, 16)
    np.testing.assert_allclose(ours[0, prefix:].numpy(), zoomed.reshape(-1, 16), atol=1e-6, rtol=0)
    assert torch.equal(ours[:, :prefix], table[:, :prefix])


def test_timms_npz_bilinear_is_not_the_official_zoom() -> None:
    # What vitscale used to call "JAX-style" (and timm uses for npz files): half-pixel bilinear.
    table = torch.randn(1, 1 + 49, 8)
    timm_npz = resample_pos_embed(table, (12, 12), mode="bilinear", antialias=False)
    zoomed = scipy.ndimage.zoom(table[0, 1:].numpy().reshape(7, 7, 8), (12 / 7, 12 / 7, 1), order=1)
    assert np.abs(timm_npz[0, 1:].numpy() - zoomed.reshape(-1, 8)).max() > 1e-2
    with pytest.raises(ValueError, match=r"mode='jax' .* has no antialias"):
        resample_pos_embed(table, (12, 12), mode="jax", antialias=True)


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


@pytest.mark.parametrize("how", ["constructor", "attribute", "wrapped"])
def test_load_resamples_with_the_configured_mode(how: str) -> None:
    small = create_model("vit_tiny_test", img_size=28, patch_size=7)
    if how == "constructor":
        big = create_model("vit_tiny_test", img_size=42, patch_size=7, posemb_resize="jax")
    else:
        big = create_model("vit_tiny_test", img_size=42, patch_size=7)
        big.posemb_resize = "jax"  # what the engine sets from finetune.posemb_resize
    assert big.config["posemb_resize"] == "jax"
    target = torch.nn.Sequential(big) if how == "wrapped" else big
    target.load_state_dict(torch.nn.Sequential(small).state_dict() if how == "wrapped" else small.state_dict())
    expected = resample_pos_embed(small.pos_embed.detach(), (6, 6), mode="jax")
    torch.testing.assert_close(big.pos_embed.detach(), expected, atol=0, rtol=0)
    assert (expected - resample_pos_embed(small.pos_embed.detach(), (6, 6))).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"posemb_resize must be one of \('timm', 'jax'\), got 'nearest'"):
        big.posemb_resize = "nearest"
    assert big.posemb_resize == "jax"
