"""State-dict adapters between vitscale and timm / the original JAX vision_transformer checkpoints.

vitscale deliberately uses timm's parameter names, so converting to and from timm is mostly a
check: timm has features vitscale does not implement (register tokens, LayerScale, fc_norm for
average pooling, attention pooling, ...), and a checkpoint using them must fail loudly instead of
loading half its weights. The JAX adapter re-lays out Flax kernels (HWIO convs, (in, out) dense,
per-head (D, H, d) attention) into PyTorch's layouts.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

# Keys both libraries name identically (vitscale names == timm names).
_SHARED_KEYS = re.compile(
    r"^(cls_token|pos_embed|norm\.(weight|bias)|head\.(weight|bias)"
    r"|patch_embed\.proj\.(weight|bias)"
    r"|patch_embed\.backbone\.stem\.(conv\.weight|norm\.(weight|bias))"
    r"|patch_embed\.backbone\.stages\.\d+\.blocks\.\d+\."
    r"(conv[123]\.weight|norm[123]\.(weight|bias)|downsample\.conv\.weight|downsample\.norm\.(weight|bias))"
    r"|blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|attn\.[qk]_norm\.(weight|bias)"
    r"|mlp\.fc[12]\.(weight|bias)))$"
)
# timm's stem-only hybrids (vit_tiny_r_s16_p8_*) use the bare stem Sequential as the backbone.
_TIMM_BARE_STEM = re.compile(r"^patch_embed\.backbone\.(conv\.weight|norm\.(weight|bias))$")
_OUR_STEM = "patch_embed.backbone.stem."
# timm < 0.9 kept the JAX representation layer as `pre_logits.fc`; timm >= 0.9 has none.
_TIMM_REPRESENTATION = "pre_logits.fc."
_OUR_REPRESENTATION = "representation.fc."


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _reject(unsupported: list[str], source: str) -> None:
    if unsupported:
        shown = ", ".join(unsupported[:8]) + (f" ... (+{len(unsupported) - 8} more)" if len(unsupported) > 8 else "")
        raise ValueError(
            f"{source} has keys vitscale cannot map (a feature vitscale's ViT does not implement, e.g. "
            f"register tokens, LayerScale, fc_norm/avg pooling, attention pooling, a non-BiT backbone): {shown}")


def from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer / hybrid state dict -> vitscale's (raises on unmappable keys)."""
    sd = _strip_wrapper_prefix(state_dict)
    out, unsupported = {}, []
    for key, value in sd.items():
        if _SHARED_KEYS.match(key):
            out[key] = value
        elif _TIMM_BARE_STEM.match(key):
            out[_OUR_STEM + key[len("patch_embed.backbone."):]] = value
        elif key.startswith(_TIMM_REPRESENTATION):
            out[_OUR_REPRESENTATION + key[len(_TIMM_REPRESENTATION):]] = value
        else:
            unsupported.append(key)
    _reject(unsupported, "timm state dict")
    return out


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitscale state dict -> the keys of timm's VisionTransformer (vit_* / vit_*_r50_* models)."""
    sd = _strip_wrapper_prefix(state_dict)
    if any(k.startswith(_OUR_REPRESENTATION) for k in sd):
        raise ValueError(
            "this model has a representation (pre-logits) layer, which timm's VisionTransformer does not "
            "have; call model.reset_head(num_classes) first to export a fine-tuning layout")
    _reject([k for k in sd if not _SHARED_KEYS.match(k)], "vitscale state dict")
    if not any(k.startswith("patch_embed.backbone.stages.") for k in sd):  # stem-only hybrid (or plain ViT)
        return {("patch_embed.backbone." + k[len(_OUR_STEM):] if k.startswith(_OUR_STEM) else k): v
                for k, v in sd.items()}
    return dict(sd)


class _NpzReader:
    """Takes arrays by key and remembers which were used, so leftovers can be reported, not lost."""

    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str, source: str):
        self.arrays, self.prefix, self.source = arrays, prefix, source
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def take(self, key: str) -> np.ndarray:
        full = self.prefix + key
        if full not in self.arrays:
            raise KeyError(f"{self.source}: missing {full!r} (expected the google-research/vision_transformer "
                           f"npz layout, see docs/models.md)")
        self.used.add(full)
        return np.asarray(self.arrays[full])

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.arrays if k.startswith(self.prefix) and k not in self.used)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _vec(array: np.ndarray) -> torch.Tensor:
    return _t(array.reshape(-1))  # some Flax versions saved norm params as (1, 1, 1, C)


def _conv(array: np.ndarray) -> torch.Tensor:
    return _t(array.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _dense(array: np.ndarray) -> torch.Tensor:
    return _t(array.T)  # (in, out) -> (out, in)


def _load_arrays(source: str | Path | Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(source, Mapping):
        return dict(source), "npz arrays"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"JAX checkpoint not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}, str(path)


def from_jax_npz(source: str | Path | Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """An original google-research/vision_transformer checkpoint (ViT or R50 hybrid) -> vitscale's
    state dict. Keys may carry the `opt/target/` or `params/` prefix of older/newer Flax savers."""
    arrays, where = _load_arrays(source)
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise KeyError(f"{where}: no 'embedding/kernel' array: not a vision_transformer checkpoint")
    r = _NpzReader(arrays, prefix, where)
    sd: dict[str, torch.Tensor] = {}

    if r.has("conv_root/kernel"):
        sd.update(_hybrid_stem(r))
    sd["patch_embed.proj.weight"] = _conv(r.take("embedding/kernel"))
    sd["patch_embed.proj.bias"] = _vec(r.take("embedding/bias"))
    if r.has("cls"):
        sd["cls_token"] = _t(r.take("cls"))
    sd["pos_embed"] = _t(r.take("Transformer/posembed_input/pos_embedding"))

    i = 0
    while r.has(f"Transformer/encoderblock_{i}/LayerNorm_0/scale"):
        sd.update(_encoder_block(r, f"Transformer/encoderblock_{i}/", f"blocks.{i}."))
        i += 1
    if i == 0:
        raise KeyError(f"{where}: no 'Transformer/encoderblock_0/...' arrays (scanned big_vision layouts are "
                       f"not supported)")
    sd["norm.weight"] = _vec(r.take("Transformer/encoder_norm/scale"))
    sd["norm.bias"] = _vec(r.take("Transformer/encoder_norm/bias"))
    if r.has("pre_logits/kernel"):
        sd["representation.fc.weight"] = _dense(r.take("pre_logits/kernel"))
        sd["representation.fc.bias"] = _vec(r.take("pre_logits/bias"))
    sd["head.weight"] = _dense(r.take("head/kernel"))
    sd["head.bias"] = _vec(r.take("head/bias"))

    leftovers = r.leftovers()
    if leftovers:
        raise ValueError(f"{where}: arrays with no place in a vitscale ViT: {', '.join(leftovers[:8])}"
                         + (f" ... (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else ""))
    return sd


def _encoder_block(r: _NpzReader, src: str, dst: str) -> dict[str, torch.Tensor]:
    mha = src + "MultiHeadDotProductAttention_1/"
    qkv_w, qkv_b = [], []
    for name in ("query", "key", "value"):
        kernel = r.take(f"{mha}{name}/kernel")  # (D, heads, head_dim)
        qkv_w.append(_t(kernel.reshape(kernel.shape[0], -1).T))
        qkv_b.append(_vec(r.take(f"{mha}{name}/bias")))
    out = r.take(f"{mha}out/kernel")  # (heads, head_dim, D)
    sd = {
        f"{dst}norm1.weight": _vec(r.take(f"{src}LayerNorm_0/scale")),
        f"{dst}norm1.bias": _vec(r.take(f"{src}LayerNorm_0/bias")),
        f"{dst}attn.qkv.weight": torch.cat(qkv_w, dim=0),
        f"{dst}attn.qkv.bias": torch.cat(qkv_b, dim=0),
        f"{dst}attn.proj.weight": _t(out.reshape(-1, out.shape[-1]).T),
        f"{dst}attn.proj.bias": _vec(r.take(f"{mha}out/bias")),
        f"{dst}norm2.weight": _vec(r.take(f"{src}LayerNorm_2/scale")),
        f"{dst}norm2.bias": _vec(r.take(f"{src}LayerNorm_2/bias")),
    }
    for j in (0, 1):
        sd[f"{dst}mlp.fc{j + 1}.weight"] = _dense(r.take(f"{src}MlpBlock_3/Dense_{j}/kernel"))
        sd[f"{dst}mlp.fc{j + 1}.bias"] = _vec(r.take(f"{src}MlpBlock_3/Dense_{j}/bias"))
    return sd


def _hybrid_stem(r: _NpzReader) -> dict[str, torch.Tensor]:
    base = "patch_embed.backbone."
    sd = {
        f"{base}stem.conv.weight": _conv(r.take("conv_root/kernel")),
        f"{base}stem.norm.weight": _vec(r.take("gn_root/scale")),
        f"{base}stem.norm.bias": _vec(r.take("gn_root/bias")),
    }
    stage = 1
    while r.has(f"block{stage}/unit1/conv1/kernel"):
        unit = 1
        while r.has(f"block{stage}/unit{unit}/conv1/kernel"):
            src, dst = f"block{stage}/unit{unit}/", f"{base}stages.{stage - 1}.blocks.{unit - 1}."
            for k in (1, 2, 3):
                sd[f"{dst}conv{k}.weight"] = _conv(r.take(f"{src}conv{k}/kernel"))
                sd[f"{dst}norm{k}.weight"] = _vec(r.take(f"{src}gn{k}/scale"))
                sd[f"{dst}norm{k}.bias"] = _vec(r.take(f"{src}gn{k}/bias"))
            if r.has(f"{src}conv_proj/kernel"):
                sd[f"{dst}downsample.conv.weight"] = _conv(r.take(f"{src}conv_proj/kernel"))
                sd[f"{dst}downsample.norm.weight"] = _vec(r.take(f"{src}gn_proj/scale"))
                sd[f"{dst}downsample.norm.bias"] = _vec(r.take(f"{src}gn_proj/bias"))
            unit += 1
        stage += 1
    return sd
