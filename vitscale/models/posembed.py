"""Resampling of learned absolute position embeddings to a new patch grid.

Fine-tuning at a higher resolution than pre-training (paper section 3.2) keeps the patch size, so
the token grid grows and the learned 1-D position embeddings are interpolated in 2-D.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def infer_square_grid(num_patch_tokens: int) -> tuple[int, int]:
    """The grid of a pos-embed table that carries no shape information (it must be square)."""
    side = math.isqrt(num_patch_tokens)
    if side * side != num_patch_tokens:
        raise ValueError(
            f"cannot infer the patch grid of a pos_embed with {num_patch_tokens} patch tokens (not a "
            f"square); pass old_grid=(h, w) to resample_pos_embed")
    return side, side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int] | list[int],
    num_prefix_tokens: int = 1,
    mode: str = "timm",
    antialias: bool | None = None,
    old_grid: tuple[int, int] | list[int] | None = None,
) -> torch.Tensor:
    """Interpolate the patch part of a `(1, prefix + gh*gw, D)` table to `new_grid`.

    Prefix tokens (class token) have no position on the grid and are kept as they are. `mode`:

    - "timm" (default): bicubic with antialiasing, equal to `timm.layers.resample_abs_pos_embed`.
    - "jax": the official fine-tuning loaders' `scipy.ndimage.zoom(grid, order=1)` (vit_jax
      `checkpoint.load_pretrained`, big_vision `vit.resample_posemb`): linear interpolation whose
      corner cells stay on the corners, i.e. torch bilinear with `align_corners=True`, no antialias.
    - any other `F.interpolate` mode ("bilinear", "bicubic", ...) with `antialias` (default True);
      `mode="bilinear", antialias=False` is what timm uses when it loads npz checkpoints (half-pixel
      centres, so *not* the official resize).

    The interpolation runs in float32 (float64 for "jax") and the result keeps the input dtype, so
    bf16 tables are safe.
    `old_grid` defaults to a square grid; non-square grids need it.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    interp = _interpolation(mode, antialias)
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if num_patches <= 0:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens, not more than num_prefix_tokens={num_prefix_tokens}")
    old_grid = infer_square_grid(num_patches) if old_grid is None else (int(old_grid[0]), int(old_grid[1]))
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_patches} patch tokens of pos_embed")
    if old_grid == new_grid:
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    # scipy interpolates in float64; so does "jax" mode, which then equals it to the last float32 bit.
    work = torch.float64 if mode == "jax" else torch.float32
    grid = grid.to(work).reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, **interp)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _interpolation(mode: str, antialias: bool | None) -> dict[str, Any]:
    """`F.interpolate` keyword arguments for a `resample_pos_embed` mode."""
    if mode == "jax":
        if antialias:
            raise ValueError("resample_pos_embed: mode='jax' (scipy.ndimage.zoom order=1) has no antialias")
        return dict(mode="bilinear", align_corners=True, antialias=False)
    if mode == "timm":
        mode = "bicubic"
    return dict(mode=mode, antialias=True if antialias is None else antialias)
