"""Named model configurations: the one table of sizes (`create_model` in vit.py builds them).

A name is only a starting point: every field of `ModelConfig` can be overridden, so sizes the
registry does not list (a 28 px Fashion-MNIST ViT, a 2-block test model) need no new entry, and
`create_model(**model.config)` rebuilds any model that was ever created, which is what tracking
stores next to the weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POOLS = ("token", "gap")
# MLP activation: exact erf GELU (timm, PyTorch default) or the tanh approximation, which is what
# `flax.linen.gelu` computes by default and so what every official vit_jax / big_vision ViT ran with.
MLP_ACTS = ("gelu", "gelu_tanh")
# Hybrid stem normalisation conventions (vitscale.models.resnet.STEM_NORMS): timm's or the JAX code's.
STEM_NORMS = ("timm", "jax")
# Position-embedding resize on load (vitscale.models.posembed): timm's bicubic or the official
# fine-tuning loader's scipy.ndimage.zoom(order=1).
POSEMB_RESIZE = ("timm", "jax")
# BiT ResNet-V2 root: 7x7/2 conv + 3x3/2 max pool; every stage after the first halves again.
RESNET_ROOT_STRIDE = 4


def backbone_stride(stem_layers: tuple[int, ...]) -> int:
    """Pixels per feature-map cell of the hybrid's ResNet stem (4 for the root alone)."""
    return RESNET_ROOT_STRIDE * 2 ** max(len(stem_layers) - 1, 0)


@dataclass
class ModelConfig:
    """Every constructor argument of a ViT; `patch_size` is always in input pixels.

    For a hybrid (`stem_layers` set) a token covers `patch_size` pixels: the ResNet stem reduces by
    `backbone_stride(stem_layers)` and a `patch_size // stride` convolution projects its feature
    map, so `r50_vit_b16` has the same 16 px token grid as `vit_b16` (timm: `vit_base_r50_s16`).
    """

    name: str
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    representation_size: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    qk_norm: bool = False
    pool: str = "token"
    stem_layers: tuple[int, ...] | None = field(default=None)
    # Numerics conventions; the defaults are timm's, `vitscale.models.convert.OFFICIAL_NUMERICS` the
    # official JAX code's (needed to reproduce its logits from its checkpoints, see docs/models.md).
    mlp_act: str = "gelu"
    stem_norm: str = "timm"
    posemb_resize: str = "timm"

    def __post_init__(self) -> None:
        self.img_size = _normalise_img_size(self.img_size)
        if self.stem_layers is not None:
            self.stem_layers = tuple(int(n) for n in self.stem_layers)
        self._validate()

    @property
    def img_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def is_hybrid(self) -> bool:
        return self.stem_layers is not None

    @property
    def num_prefix_tokens(self) -> int:
        # The paper's class token exists only for token pooling; 'gap' follows the JAX code (no token).
        return 1 if self.pool == "token" else 0

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        where = f"model {self.name!r}"
        for key in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"{where}: {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.num_classes < 0:
            raise ValueError(f"{where}: num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        h, w = self.img_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"{where}: img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"{where}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for key, allowed in (("pool", POOLS), ("mlp_act", MLP_ACTS), ("stem_norm", STEM_NORMS),
                             ("posemb_resize", POSEMB_RESIZE)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{where}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= float(getattr(self, key)) < 1.0:
                raise ValueError(f"{where}: {key} must be in [0, 1), got {getattr(self, key)!r}")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(f"{where}: representation_size must be positive or None")
        if self.is_hybrid:
            stride = backbone_stride(self.stem_layers)
            if self.patch_size % stride:
                raise ValueError(
                    f"{where}: patch_size {self.patch_size} must be a multiple of the ResNet stem "
                    f"stride {stride} (stem_layers={self.stem_layers})")


def _normalise_img_size(img_size: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    """Square sizes stay an int, others become (h, w): JSON lists from a logged config round-trip."""
    if isinstance(img_size, int):
        return img_size
    h, w = (int(v) for v in img_size)
    return h if h == w else (h, w)


_B16 = dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
_L = dict(embed_dim=1024, depth=24, num_heads=16)
_REGISTRY: dict[str, dict[str, Any]] = {
    # Paper Table 1 (ViT-B/L/H) plus the DeiT-style Ti/S sizes used by the How-to-train-your-ViT paper.
    "vit_ti16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_s16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_b16": _B16,
    "vit_b32": dict(_B16, patch_size=32),
    "vit_l16": dict(_L, patch_size=16),
    "vit_l32": dict(_L, patch_size=32),
    "vit_h14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    # Hybrids: R50 stages (3, 4, 9) end at stride 16 (1x1 projection); the full R50 ends at stride 32.
    "r50_vit_b16": dict(_B16, stem_layers=(3, 4, 9)),
    "r50_vit_l32": dict(_L, patch_size=32, stem_layers=(3, 4, 6, 3)),
    # Small enough for CPU unit tests of other packages (milliseconds per step).
    "vit_tiny_test": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10),
    "r50_vit_tiny_test": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              num_classes=10, stem_layers=(1, 1)),
}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name")


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The resolved configuration `create_model` would build, without allocating any weights."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for model {name!r}; allowed: {', '.join(OVERRIDABLE)}")
    return ModelConfig(name=name, **{**_REGISTRY[name], **overrides})
