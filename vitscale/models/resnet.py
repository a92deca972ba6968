"""BiT ResNet-V2 stem of the hybrid ViT: weight-standardised convolutions and GroupNorm(32).

Follows the official JAX hybrid (non pre-activation bottlenecks, stride in the 3x3 conv, TF "SAME"
padding) and timm's parameter names (`stem.conv`, `stages.i.blocks.j.conv1`, ...), so weights move
between the three without renaming. Batch-size independent normalisation is what lets the stem
train with the small per-device batches of large-scale pre-training.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitscale.models.init import lecun_normal_

STEM_WIDTH = 64
STAGE_WIDTHS = (256, 512, 1024, 2048)
GROUP_NORM_GROUPS = 32


@dataclass(frozen=True)
class StemNorm:
    """How the stem normalises: weight standardisation `(w - mean) / denominator` and GroupNorm eps.

    The two conventions differ in the formula, not just the constant: timm divides by
    `sqrt(var + ws_eps)`, the official JAX `weight_standardize` by `std + ws_eps`. For a kernel std
    of 0.01-0.1 that is a relative change of 1e-4 to 1e-3 per conv (1e-5 to 3e-5 in the logits of the
    small hybrids of tests/test_jax_official.py, on top of the GELU difference): an official
    checkpoint needs "jax" to reproduce the official numbers, a timm one "timm".
    """

    ws_eps: float
    ws_eps_on_std: bool  # True: std + eps (JAX); False: sqrt(var + eps) (timm)
    gn_eps: float


STEM_NORMS = {
    "timm": StemNorm(ws_eps=1e-8, ws_eps_on_std=False, gn_eps=1e-5),  # timm's ResNetV2 / hybrid ViT
    "jax": StemNorm(ws_eps=1e-5, ws_eps_on_std=True, gn_eps=1e-6),  # vit_jax models_resnet + flax GroupNorm
}
# Kept for callers of the old module constants (the timm convention, still the default).
STD_CONV_EPS = STEM_NORMS["timm"].ws_eps
GROUP_NORM_EPS = STEM_NORMS["timm"].gn_eps


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding TF 'SAME' adds so that the output has ceil(size / stride) cells."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Asymmetric (extra row/column at the bottom/right) padding, as TF and JAX do for 'SAME'."""
    pad_h = same_padding(x.shape[-2], kernel[0], stride[0])
    pad_w = same_padding(x.shape[-1], kernel[1], stride[1])
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class StdConv2dSame(nn.Conv2d):
    """Bias-free conv whose kernel is standardised (zero mean, unit variance per output channel)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = STD_CONV_EPS,
                 eps_on_std: bool = False):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, bias=False)
        self.eps, self.eps_on_std = eps, eps_on_std

    def standardized_weight(self) -> torch.Tensor:
        # fp32 because the tiny eps and the variance are meaningless in bf16.
        w = self.weight
        flat = w.reshape(1, w.shape[0], -1).float()
        if self.eps_on_std:  # JAX: (w - mean) / (std + eps), population std over (kh, kw, in)
            flat = flat - flat.mean(dim=-1, keepdim=True)
            flat = flat / (flat.square().mean(dim=-1, keepdim=True).sqrt() + self.eps)
        else:
            # batch_norm over the flattened kernel (no running stats) is timm's standardisation in one
            # fused kernel, the same op timm uses, so converted checkpoints give bit-identical weights.
            flat = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=self.eps)
        return flat.reshape(w.shape).to(w.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}" + (" (on std)" if self.eps_on_std else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride)
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


class MaxPool2dSame(nn.Module):
    """3x3/2 max pool with 'SAME' padding by -inf (padding never wins the max)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = (self.kernel_size,) * 2, (self.stride,) * 2
        return F.max_pool2d(pad_same(x, k, s, value=-math.inf), k, s)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) optionally followed by ReLU; one module so state-dict names match timm's."""

    def __init__(self, num_channels: int, apply_act: bool = True):
        super().__init__(GROUP_NORM_GROUPS, num_channels, eps=GROUP_NORM_EPS)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.apply_act else x


class DownsampleConv(nn.Module):
    """Projection shortcut: 1x1 strided conv + GroupNorm without activation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck; ReLU after the residual sum (non pre-activation)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, project: bool):
        super().__init__()
        mid_chs = out_chs // 4
        self.downsample = DownsampleConv(in_chs, out_chs, stride) if project else None
        self.conv1 = StdConv2dSame(in_chs, mid_chs, 1)
        self.norm1 = GroupNormAct(mid_chs)
        self.conv2 = StdConv2dSame(mid_chs, mid_chs, 3, stride=stride)
        self.norm2 = GroupNormAct(mid_chs)
        self.conv3 = StdConv2dSame(mid_chs, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, project=i == 0)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2Stem(nn.Module):
    """Root (7x7/2 conv, GN, ReLU, 3x3/2 max pool) plus `len(layers)` bottleneck stages.

    `layers=()` keeps only the root (stride 4); (3, 4, 9) is the paper's R50 cut after stage 3
    (stride 16, 1024 channels); (3, 4, 6, 3) the full R50 (stride 32, 2048 channels).
    """

    def __init__(self, layers: tuple[int, ...], in_chans: int = 3, norm: str = "timm"):
        super().__init__()
        if len(layers) > len(STAGE_WIDTHS) or any(n <= 0 for n in layers):
            raise ValueError(f"stem_layers must hold 0 to {len(STAGE_WIDTHS)} positive block counts, got {layers}")
        self.layers = tuple(layers)
        self.stem = nn.Sequential(OrderedDict(
            conv=StdConv2dSame(in_chans, STEM_WIDTH, 7, stride=2),
            norm=GroupNormAct(STEM_WIDTH),
            pool=MaxPool2dSame(3, 2),
        ))
        stages, prev = [], STEM_WIDTH
        for i, depth in enumerate(self.layers):
            stages.append(ResNetStage(prev, STAGE_WIDTHS[i], stride=1 if i == 0 else 2, depth=depth))
            prev = STAGE_WIDTHS[i]
        self.stages = nn.Sequential(*stages)
        self.out_channels = prev
        self.set_norm(norm)
        self.reset_parameters()

    def set_norm(self, norm: str) -> None:
        """Switch every standardised conv and GroupNorm to a `STEM_NORMS` convention ("timm"/"jax").

        Only constants change (no parameters), so it can be applied to a built model; the ViT calls
        it with `ModelConfig.stem_norm`.
        """
        if norm not in STEM_NORMS:
            raise ValueError(f"stem norm must be one of {tuple(STEM_NORMS)}, got {norm!r}")
        conv = STEM_NORMS[norm]
        self.norm_convention = norm
        for m in self.modules():
            if isinstance(m, StdConv2dSame):
                m.eps, m.eps_on_std = conv.ws_eps, conv.ws_eps_on_std
            elif isinstance(m, nn.GroupNorm):
                m.eps = conv.gn_eps

    def reset_parameters(self) -> None:
        # JAX/Flax default for convs (lecun normal); the standardisation makes the scale irrelevant
        # to the forward pass but it still sets the gradient scale.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

