"""Transformer encoder pieces: pre-LN block, multi-head self-attention, GELU MLP, stochastic depth.

Parameter names follow timm (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so a
timm state dict is a vitscale state dict; the fused qkv projection is one matmul instead of three.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-6  # as in the JAX code and timm's ViTs (PyTorch's default is 1e-5)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch, rescale the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash/memory-efficient on GPU)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0,
                 qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LAYER_NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LAYER_NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return self.proj_drop(self.proj(x))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) softmax weights, materialised explicitly for analysis (SDPA never exposes them)."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


# ModelConfig.mlp_act -> nn.GELU's `approximate`. The official JAX MlpBlocks (vit_jax and big_vision)
# call `flax.linen.gelu`, whose default is the tanh approximation; timm (and the vitscale default) use
# the exact erf form. The two differ by up to 5e-4 per activation and by 4e-4 to 8e-4 in the logits of
# the small ViTs of tests/test_jax_official.py: reproducing a JAX checkpoint's numbers needs "gelu_tanh".
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, act: str = "gelu"):
        super().__init__()
        if act not in _GELU_APPROXIMATE:
            raise ValueError(f"Mlp: act must be one of {tuple(_GELU_APPROXIMATE)}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=_GELU_APPROXIMATE[act])
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper eq. 2-3)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, dropout: float = 0.0,
                 attn_dropout: float = 0.0, drop_path: float = 0.0, qk_norm: bool = False,
                 mlp_act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, attn_dropout=attn_dropout, proj_dropout=dropout, qk_norm=qk_norm)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_hidden_dim, dropout=dropout, act=mlp_act)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
