"""Image-to-token embeddings: linear patch projection, or a ResNet feature map projected per cell."""
from __future__ import annotations

import torch
import torch.nn as nn

from vitscale.models.registry import ModelConfig, backbone_stride
from vitscale.models.resnet import ResNetV2Stem


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly projected (a strided conv is that linear map)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridEmbed(nn.Module):
    """ResNet stem, then a (patch_size / stem stride)-sized projection of its feature map (paper 3.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.stem_layers is not None
        self.backbone = ResNetV2Stem(cfg.stem_layers, cfg.in_chans)
        kernel = cfg.patch_size // backbone_stride(cfg.stem_layers)
        self.proj = nn.Conv2d(self.backbone.out_channels, cfg.embed_dim, kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


def build_embed(cfg: ModelConfig) -> nn.Module:
    return HybridEmbed(cfg) if cfg.is_hybrid else PatchEmbed(cfg)
