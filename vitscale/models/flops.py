"""Analytic forward multiply-accumulates (MACs) per image, for MFU and for comparing model sizes.

Counted: every matmul and convolution (patch/stem convs, qkv, attention scores and weighted sum,
output projection, MLP, pre-logits, head). Not counted: LayerNorm, GroupNorm, GELU, softmax, adds,
pooling; they are elementwise, a fraction of a percent of the total, and do not run on tensor cores.
Training FLOPs per image are about 3 (forward + backward) x 2 (FLOPs per MAC) x this number.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vitscale.models.registry import ModelConfig, backbone_stride
from vitscale.models.resnet import STAGE_WIDTHS, STEM_WIDTH


def _conv_out(size: int, stride: int) -> int:
    return math.ceil(size / stride)  # 'SAME' padding, as the hybrid stem uses


def resnet_stem_macs(layers: tuple[int, ...], in_chans: int, height: int, width: int) -> tuple[int, int, int]:
    """(MACs, out_height, out_width) of the BiT ResNet-V2 stem in `vitscale.models.resnet`."""
    h, w = _conv_out(height, 2), _conv_out(width, 2)
    macs = h * w * STEM_WIDTH * in_chans * 7 * 7
    h, w = _conv_out(h, 2), _conv_out(w, 2)  # max pool
    prev = STEM_WIDTH
    for stage, depth in enumerate(layers):
        out, stride = STAGE_WIDTHS[stage], 1 if stage == 0 else 2
        mid = out // 4
        for block in range(depth):
            in_chs, s = (prev, stride) if block == 0 else (out, 1)
            oh, ow = _conv_out(h, s), _conv_out(w, s)
            macs += h * w * in_chs * mid  # conv1 1x1 at the input resolution
            macs += oh * ow * mid * mid * 9  # conv2 3x3, carries the stride
            macs += oh * ow * mid * out  # conv3 1x1
            if block == 0:
                macs += oh * ow * in_chs * out  # projection shortcut
            h, w = oh, ow
        prev = out
    return macs, h, w


def macs_per_image(model: Any, img_size: int | tuple[int, int] | None = None) -> int:
    """Forward MACs for one image of `img_size` (default: the model's own size).

    `model` is a VisionTransformer, its `config` dict, or a `ModelConfig`; nothing is allocated, so
    `macs_per_image(model_config("vit_h14"), 224)` sizes a model without building it.
    """
    cfg = _as_config(model)
    if img_size is not None:
        cfg = ModelConfig(**{**cfg.to_dict(), "img_size": img_size})
    height, width = cfg.img_hw
    gh, gw = cfg.grid_size
    patches = gh * gw
    tokens = patches + cfg.num_prefix_tokens
    dim, hidden = cfg.embed_dim, cfg.mlp_hidden_dim

    if cfg.is_hybrid:
        macs, _, _ = resnet_stem_macs(cfg.stem_layers, cfg.in_chans, height, width)
        kernel = cfg.patch_size // backbone_stride(cfg.stem_layers)
        feat_chs = STAGE_WIDTHS[len(cfg.stem_layers) - 1] if cfg.stem_layers else STEM_WIDTH
        macs += patches * dim * feat_chs * kernel * kernel
    else:
        macs = patches * dim * cfg.in_chans * cfg.patch_size ** 2

    per_block = (
        tokens * dim * 3 * dim  # qkv projection
        + 2 * tokens * tokens * dim  # q @ k^T and attn @ v, summed over heads
        + tokens * dim * dim  # output projection
        + 2 * tokens * dim * hidden  # MLP
    )
    macs += cfg.depth * per_block
    features = dim
    if cfg.representation_size:
        macs += dim * cfg.representation_size
        features = cfg.representation_size
    macs += features * cfg.num_classes
    return int(macs)


def _as_config(model: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    config = getattr(model, "config", model)
    if not isinstance(config, Mapping):
        raise TypeError(f"macs_per_image needs a vitscale model, its config dict or a ModelConfig, got {type(model)}")
    return ModelConfig(**config)
