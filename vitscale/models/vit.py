"""Vision Transformer (Dosovitskiy et al. 2020), plain and hybrid, in pure PyTorch.

The model knows nothing about the training engine: activation checkpointing, sharding and mixed
precision are applied from outside through `blocks`, `set_checkpointing` and ordinary modules.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from vitscale.models.embed import build_embed
from vitscale.models.flops import macs_per_image
from vitscale.models.init import lecun_normal_
from vitscale.models.layers import LAYER_NORM_EPS, Block
from vitscale.models.posembed import infer_square_grid, resample_pos_embed
from vitscale.models.registry import ModelConfig, model_config

CheckpointFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Representation(nn.Module):
    """The pre-training head's hidden layer (JAX `pre_logits`: Dense + tanh), dropped for fine-tuning."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.fc = nn.Linear(dim, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """Patch (or ResNet) embedding, class token, learned 1-D position embedding, pre-LN encoder,
    final LayerNorm, then [representation MLP] and a linear classifier.

    Build through `vitscale.models.create_model`; `config` rebuilds the same architecture.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grid_size = cfg.grid_size
        self.num_features = cfg.embed_dim
        self.patch_embed = build_embed(cfg)
        if cfg.is_hybrid:  # timm's or the official JAX stem normalisation (constants only)
            self.patch_embed.backbone.set_norm(cfg.stem_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if self.num_prefix_tokens else None
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        drop_path = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim, dropout=cfg.dropout,
                  attn_dropout=cfg.attn_dropout, drop_path=dp, qk_norm=cfg.qk_norm, mlp_act=cfg.mlp_act)
            for dp in drop_path
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.representation: nn.Module = (
            Representation(cfg.embed_dim, cfg.representation_size) if cfg.representation_size else nn.Identity())
        self.head = self._new_head(cfg.num_classes)
        self._checkpoint_fn: CheckpointFn | None = None
        self._checkpoint_every = 1
        self.register_load_state_dict_pre_hook(_resample_pos_embed_on_load)
        self.init_weights()

    # ---- construction ------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Every resolved constructor argument plus `name`: `create_model(**model.config)` rebuilds."""
        return self.cfg.to_dict()

    @property
    def head_features(self) -> int:
        return self.cfg.representation_size or self.cfg.embed_dim

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        ref = self.pos_embed
        head = nn.Linear(self.head_features, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(head.weight)  # zero head: fine-tuning starts from the pre-trained features' logits = 0
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official JAX initialisation (the paper's), so from-scratch runs are comparable to it."""
        # JAX: normal(0.02); timm's trunc_normal_(std=.02) truncates at +-2.0 absolute, i.e. the same.
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        for name, m in self.named_modules():
            if name.startswith("patch_embed.backbone"):
                continue  # the ResNet initialises itself
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and not name.startswith("head"):
                if name.endswith("qkv"):
                    # JAX has separate query/key/value Dense layers: Xavier per (dim x dim) chunk.
                    for chunk in m.weight.chunk(3, dim=0):
                        nn.init.xavier_uniform_(chunk)
                elif name.startswith("representation"):
                    lecun_normal_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if ".mlp." in f".{name}":
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (timm convention)."""
        return {"pos_embed", "cls_token"}

    # ---- engine hooks ------------------------------------------------------------------------
    def set_checkpointing(self, fn: CheckpointFn | None, every: int = 1) -> None:
        """Run blocks 0, every, 2*every, ... through `fn(block, x)` (e.g. a non-reentrant
        torch.utils.checkpoint); `None` turns checkpointing off. Only applies while grad is enabled."""
        if every < 1:
            raise ValueError(f"set_checkpointing: every must be >= 1, got {every}")
        self._checkpoint_fn, self._checkpoint_every = fn, every

    @property
    def posemb_resize(self) -> str:
        """How a checkpoint pos_embed of another grid is resampled on load: "timm" (bicubic,
        antialiased) or "jax" (the official fine-tuning loader's scipy.ndimage.zoom(order=1))."""
        return self.cfg.posemb_resize

    @posemb_resize.setter
    def posemb_resize(self, mode: str) -> None:
        # Through ModelConfig so the value is validated and `model.config` records it.
        self.cfg = ModelConfig(**{**self.cfg.to_dict(), "posemb_resize": mode})

    def reset_head(self, num_classes: int) -> None:
        """Fine-tuning head: drop the representation layer, new zero-initialised Linear (0 = none)."""
        if num_classes < 0:
            raise ValueError(f"reset_head: num_classes must be >= 0, got {num_classes}")
        self.cfg = ModelConfig(**{**self.cfg.to_dict(), "num_classes": num_classes, "representation_size": None})
        self.representation = nn.Identity()
        self.head = self._new_head(num_classes)

    def macs_per_image(self, img_size: int | tuple[int, int] | None = None) -> int:
        """Forward multiply-accumulates for one image (see vitscale.models.flops)."""
        return macs_per_image(self, img_size)

    # ---- forward -----------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.in_chans, *self.cfg.img_hw)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"model {self.cfg.name!r} expects images of shape (B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, T, D) tokens after the final LayerNorm."""
        x = self._embed(x)
        fn, every = self._checkpoint_fn, self._checkpoint_every
        use_fn = fn is not None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = fn(block, x) if use_fn and i % every == 0 else block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.cfg.pool == "token":
            x = tokens[:, 0]
        else:
            x = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.representation(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) image features before the classifier, for linear probes and few-shot evaluation."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block (B, heads, T, T) attention weights (explicit softmax: slow, for analysis only)."""
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_probs(block.norm1(x)))
            x = block(x)
        return maps

    # ---- loading -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As nn.Module's, plus a pos_embed of another grid is resampled (`posemb_resize`: timm's
        bicubic by default, or the official JAX zoom) and a strict mismatch raises one ValueError
        naming every missing/unexpected/misshapen key."""
        if strict:
            self._check_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        misshapen = [  # pos_embed is resampled by the load hook; numel 0 = a ZeRO-3 partitioned parameter
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in state_dict and k != "pos_embed" and own[k].numel() > 0
            and tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)
        ]
        if not (missing or unexpected or misshapen):
            return
        parts = [f"state dict does not fit model {self.cfg.name!r}"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", misshapen)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label} [{shown}]")
        if any(k.startswith("head.") for k in missing + unexpected) or any(m.startswith("head.") for m in misshapen):
            parts.append("hint: for another number of classes drop the head.* keys, load with strict=False, "
                         "then call reset_head(num_classes)")
        if any(k.startswith(("module.", "model.")) for k in unexpected):
            parts.append("hint: strip the wrapper prefix (module./model.) from the keys")
        raise ValueError("; ".join(parts))


def _resample_pos_embed_on_load(module: VisionTransformer, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load hook: fits a checkpoint's pos_embed to this model's grid (fine-tuning at another resolution).

    A hook rather than code in load_state_dict so it also runs when the ViT is nested in a wrapper
    (DDP, DeepSpeed engine) whose own load_state_dict is the one called.
    """
    key = prefix + "pos_embed"
    if key not in state_dict:
        return
    src = state_dict[key]
    if src.numel() == 0:
        return  # a ZeRO-3 partition placeholder: the engine restores the real values itself
    cfg = module.cfg
    tokens = module.grid_size[0] * module.grid_size[1] + module.num_prefix_tokens
    if src.ndim != 3 or src.shape[-1] != cfg.embed_dim or src.shape[1] <= module.num_prefix_tokens:
        raise ValueError(f"{key}: checkpoint shape {tuple(src.shape)} cannot be resampled to "
                         f"(1, {tokens}, {cfg.embed_dim})")
    if src.shape[1] == tokens:
        return
    old_grid = infer_square_grid(src.shape[1] - module.num_prefix_tokens)
    state_dict[key] = resample_pos_embed(src, module.grid_size, module.num_prefix_tokens,
                                         mode=cfg.posemb_resize, old_grid=old_grid)


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered model (vitscale.models.registry); any ModelConfig field can be overridden.
    Wrap in `with torch.device("meta"):` to size big ones for free."""
    return VisionTransformer(model_config(name, **overrides))

