"""State-dict adapters between vitscale and timm / the official JAX (vit_jax, big_vision) npz files.

vitscale deliberately uses timm's parameter names, so converting to and from timm is mostly a
check: timm has features vitscale does not implement (register tokens, LayerScale, fc_norm for
average pooling, attention pooling, ...), and a checkpoint using them must fail loudly instead of
loading half its weights. The JAX adapters re-lay out Flax kernels (HWIO convs, (in, out) dense,
per-head (D, H, d) attention) both ways, for every naming generation of the official code; the
numerics that reproduce the official logits are model options (`OFFICIAL_NUMERICS`), not
conversions, because the weights are the same either way.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from vitscale.models.posembed import infer_square_grid
from vitscale.models.registry import backbone_stride

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


# ---- google-research/vision_transformer and big_vision npz checkpoints --------------------------
# The options under which a vitscale model computes what the official JAX code computes (tanh GELU
# of flax.linen.gelu, the JAX stem normalisation, the scipy.ndimage.zoom resize on load): pass them
# to create_model for a model built from (or exported to) an official checkpoint.
OFFICIAL_NUMERICS: dict[str, str] = {"mlp_act": "gelu_tanh", "stem_norm": "jax", "posemb_resize": "jax"}

# The four parameterised layers of an encoder block, per generation of the Flax code: pre-Linen
# numbered every sub-module in one sequence (flax's convert_pre_linen renumbers them when the official
# code loads such a file); Linen numbers per type (vit_jax today, big_vision).
_BLOCK_NAMES = {
    "release": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "linen": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
JAX_LAYOUTS: dict[str, str] = {
    "vit_jax_release": "vision_transformer / AugReg release files: pre-Linen names, Transformer/posembed_input",
    "vit_jax": "current vision_transformer (Linen) code: Linen block names, Transformer/posembed_input",
    "big_vision": "big_vision ViT: Linen block names, top-level pos_embedding added before the class token",
    "big_vision_scan": "big_vision ViT with scan=True: Transformer/encoderblock/... stacked over layers",
}
_PREFIXES = ("", "opt/target/", "params/")  # plain params, flax.optim training state, big_vision state
_VIT_JAX_POS = "Transformer/posembed_input/pos_embedding"
_BIG_VISION_POS = ("pos_embedding", "Transformer/pos_embedding")  # the latter: big_vision before 2022


class JaxCheckpointError(ValueError):
    """An npz that is not, or not entirely, a ViT checkpoint in a layout vitscale knows."""


def _fail(where: str, what: str, layout: str | None = None) -> NoReturn:
    detected = f"read as {layout}; " if layout else ""
    raise JaxCheckpointError(
        f"{where}: {what} ({detected}known layouts: {', '.join(JAX_LAYOUTS)}, optionally prefixed "
        f"'opt/target/' or 'params/'; see docs/models.md)")


class _NpzReader:
    """Takes arrays by key and remembers which were used, so leftovers are reported, not lost."""

    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str, where: str, layout: str):
        self.arrays, self.prefix, self.where, self.layout = arrays, prefix, where, layout
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def take(self, key: str, index: int | None = None) -> np.ndarray:
        full = self.prefix + key
        if full not in self.arrays:
            _fail(self.where, f"missing {full!r}", self.layout)
        self.used.add(full)
        array = np.asarray(self.arrays[full])
        if array.dtype.kind not in "fiu":  # jax saves bfloat16 as raw 2-byte voids
            _fail(self.where, f"{full!r} has dtype {array.dtype} (bfloat16?): save it as float32", self.layout)
        return array if index is None else array[index]

    def check_all_used(self) -> None:
        # Keys outside the prefix (optimizer state next to opt/target/ or params/) are not weights.
        left = sorted(k for k in self.arrays if k.startswith(self.prefix) and k not in self.used)
        if left:
            more = f" (+{len(left) - 1} more)" if len(left) > 1 else ""
            _fail(self.where, f"unexpected {left[0]!r}{more}: no place in a vitscale ViT", self.layout)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _vec(array: np.ndarray) -> torch.Tensor:
    return _t(array.reshape(-1))  # flax < 0.3.6 saved GroupNorm params as (1, 1, 1, C)


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


def _detect(arrays: Mapping[str, np.ndarray], where: str) -> tuple[str, str, str, bool]:
    """(prefix, layout, position-embedding key, scanned) of a checkpoint, from its key names."""
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        _fail(where, "no 'embedding/kernel' array: not a ViT checkpoint")
    if f"{prefix}MAPHead_0/probe" in arrays:
        _fail(where, f"{prefix + 'MAPHead_0/probe'!r}: attention pooling (big_vision pool_type='map') is "
                     f"not implemented by vitscale")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in arrays
    block0 = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    pos_key = next((k for k in (_VIT_JAX_POS, *_BIG_VISION_POS) if prefix + k in arrays), None)
    if pos_key is None:
        _fail(where, f"missing {prefix + _VIT_JAX_POS!r} or {prefix + 'pos_embedding'!r} (big_vision "
                     f"posemb='sincos2d' has no learned table and is not supported)")
    release = f"{prefix}{block0}{_BLOCK_NAMES['release'][1]}/query/kernel" in arrays
    if pos_key == _VIT_JAX_POS:
        layout = "vit_jax_release" if release else "vit_jax"
    else:
        layout = "big_vision_scan" if scanned else "big_vision"
    return prefix, layout, pos_key, scanned


def _read_jax(source: str | Path | Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays, where = _load_arrays(source)
    prefix, layout, pos_key, scanned = _detect(arrays, where)
    r = _NpzReader(arrays, prefix, where, layout)
    sd: dict[str, torch.Tensor] = {}
    stem_layers = _hybrid_stem(r, sd) if r.has("conv_root/kernel") else None
    sd["patch_embed.proj.weight"] = _conv(r.take("embedding/kernel"))
    sd["patch_embed.proj.bias"] = _vec(r.take("embedding/bias"))
    pos = r.take(pos_key).reshape(1, -1, sd["patch_embed.proj.bias"].shape[0])
    if r.has("cls"):
        sd["cls_token"] = _t(r.take("cls").reshape(1, 1, -1))
        side = math.isqrt(pos.shape[1])
        if pos_key != _VIT_JAX_POS and side * side == pos.shape[1]:
            # big_vision adds the table *before* concatenating the class token: a zero row for it is
            # exact. (Its old files with side*side + 1 rows already hold vitscale's layout.)
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    sd["pos_embed"] = _t(pos)

    names = _BLOCK_NAMES["release" if layout == "vit_jax_release" else "linen"]
    if scanned:
        depth = r.take("Transformer/encoderblock/LayerNorm_0/scale").shape[0]
        blocks = [("Transformer/encoderblock/", i) for i in range(depth)]
    else:
        depth = 0
        while r.has(f"Transformer/encoderblock_{depth}/LayerNorm_0/scale"):
            depth += 1
        blocks = [(f"Transformer/encoderblock_{i}/", None) for i in range(depth)]
    if not blocks:
        _fail(where, f"missing {prefix + 'Transformer/encoderblock_0/LayerNorm_0/scale'!r}", layout)
    for i, (src, index) in enumerate(blocks):
        sd.update(_encoder_block(r, src, f"blocks.{i}.", names, index))
    num_heads = arrays[f"{prefix}{blocks[0][0]}{names[1]}/query/kernel"].shape[-2]
    sd["norm.weight"] = _vec(r.take("Transformer/encoder_norm/scale"))
    sd["norm.bias"] = _vec(r.take("Transformer/encoder_norm/bias"))
    if r.has("pre_logits/kernel"):
        sd["representation.fc.weight"] = _dense(r.take("pre_logits/kernel"))
        sd["representation.fc.bias"] = _vec(r.take("pre_logits/bias"))
    if r.has("head/kernel") or r.has("head/bias"):
        sd["head.weight"] = _dense(r.take("head/kernel"))
        sd["head.bias"] = _vec(r.take("head/bias"))
    r.check_all_used()
    return sd, dict(layout=layout, num_heads=int(num_heads), depth=depth, stem_layers=stem_layers)


def from_jax_npz(source: str | Path | Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """An official ViT / R50+ViT checkpoint (any of `JAX_LAYOUTS`, detected from the key names) ->
    vitscale's state dict. Build the model with `jax_npz_config(source)` (or the matching config plus
    `OFFICIAL_NUMERICS`) to compute what the official code computes. Raises one JaxCheckpointError
    naming the first missing or unexpected array."""
    return _read_jax(source)[0]


def jax_npz_layout(source: str | Path | Mapping[str, np.ndarray]) -> str:
    """Which of `JAX_LAYOUTS` a checkpoint is in (after validating all of it)."""
    return _read_jax(source)[1]["layout"]


def jax_npz_config(source: str | Path | Mapping[str, np.ndarray]) -> dict[str, Any]:
    """`create_model` overrides that rebuild a checkpoint's architecture with the official numerics:
    `create_model("vit_b16", **jax_npz_config(path)).load_state_dict(from_jax_npz(path))`.

    `img_size` is the pre-training resolution (grid x patch); override it to fine-tune elsewhere.
    big_vision's pool_type "0" (first patch token, no class token) has the weights of "gap" and
    cannot be told apart: "gap" is assumed.
    """
    sd, meta = _read_jax(source)
    stem = meta["stem_layers"]
    dim, in_proj, kernel = sd["patch_embed.proj.weight"].shape[:3]
    in_chans = sd["patch_embed.backbone.stem.conv.weight"].shape[1] if stem is not None else in_proj
    patch = kernel * (backbone_stride(stem) if stem is not None else 1)
    prefix = int("cls_token" in sd)
    grid, _ = infer_square_grid(sd["pos_embed"].shape[1] - prefix)
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # float rounding below the integer: nudge up one ulp
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    rep = sd.get("representation.fc.weight")
    return dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                embed_dim=dim, depth=meta["depth"], num_heads=meta["num_heads"], mlp_ratio=mlp_ratio,
                representation_size=None if rep is None else rep.shape[0], qk_norm=False,
                pool="token" if prefix else "gap", stem_layers=stem, **OFFICIAL_NUMERICS)


def _encoder_block(r: _NpzReader, src: str, dst: str, names: tuple[str, ...],
                   index: int | None) -> dict[str, torch.Tensor]:
    ln1, mha, ln2, mlp = (src + n + "/" for n in names)
    qkv_w, qkv_b = [], []
    for name in ("query", "key", "value"):
        kernel = r.take(f"{mha}{name}/kernel", index)  # (D, heads, head_dim)
        qkv_w.append(_t(kernel.reshape(kernel.shape[0], -1).T))
        qkv_b.append(_vec(r.take(f"{mha}{name}/bias", index)))
    out = r.take(f"{mha}out/kernel", index)  # (heads, head_dim, D)
    sd = {
        f"{dst}norm1.weight": _vec(r.take(f"{ln1}scale", index)),
        f"{dst}norm1.bias": _vec(r.take(f"{ln1}bias", index)),
        f"{dst}attn.qkv.weight": torch.cat(qkv_w, dim=0),
        f"{dst}attn.qkv.bias": torch.cat(qkv_b, dim=0),
        f"{dst}attn.proj.weight": _t(out.reshape(-1, out.shape[-1]).T),
        f"{dst}attn.proj.bias": _vec(r.take(f"{mha}out/bias", index)),
        f"{dst}norm2.weight": _vec(r.take(f"{ln2}scale", index)),
        f"{dst}norm2.bias": _vec(r.take(f"{ln2}bias", index)),
    }
    for j in (0, 1):
        sd[f"{dst}mlp.fc{j + 1}.weight"] = _dense(r.take(f"{mlp}Dense_{j}/kernel", index))
        sd[f"{dst}mlp.fc{j + 1}.bias"] = _vec(r.take(f"{mlp}Dense_{j}/bias", index))
    return sd


# (npz name, vitscale name) within one bottleneck unit, its projection shortcut, and the root.
_UNIT_NAMES = [(f"conv{k}/kernel", f"conv{k}.weight") for k in (1, 2, 3)] + [
    (f"gn{k}/{a}", f"norm{k}.{b}") for k in (1, 2, 3) for a, b in (("scale", "weight"), ("bias", "bias"))]
_PROJ_NAMES = [("conv_proj/kernel", "downsample.conv.weight"), ("gn_proj/scale", "downsample.norm.weight"),
               ("gn_proj/bias", "downsample.norm.bias")]
_ROOT_NAMES = [("conv_root/kernel", "stem.conv.weight"), ("gn_root/scale", "stem.norm.weight"),
               ("gn_root/bias", "stem.norm.bias")]
_BACKBONE = "patch_embed.backbone."
_UNIT_KEY = re.compile(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.")


def _hybrid_stem(r: _NpzReader, sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Reads the vit_jax ResNet root and stages into `sd`; returns the units per stage."""
    for src, dst in _ROOT_NAMES:
        sd[_BACKBONE + dst] = (_conv if src.endswith("kernel") else _vec)(r.take(src))
    layers = []
    while r.has(f"block{len(layers) + 1}/unit1/conv1/kernel"):
        stage, unit = len(layers) + 1, 1
        while r.has(f"block{stage}/unit{unit}/conv1/kernel"):
            src, dst = f"block{stage}/unit{unit}/", f"{_BACKBONE}stages.{stage - 1}.blocks.{unit - 1}."
            for a, b in _UNIT_NAMES + (_PROJ_NAMES if unit == 1 else []):  # the first unit projects
                sd[dst + b] = (_conv if a.endswith("kernel") else _vec)(r.take(src + a))
            unit += 1
        layers.append(unit - 1)
    return tuple(layers)


def to_jax_npz(state_dict: Mapping[str, torch.Tensor], num_heads: int, path: str | Path | None = None,
               layout: str = "vit_jax") -> dict[str, np.ndarray]:
    """vitscale state dict -> the arrays an official saver writes in `layout` (see `JAX_LAYOUTS`),
    also written to `path` (np.savez, as the official savers) when given. `num_heads` splits the
    fused qkv into the per-head (D, H, d) kernels. A model trained with the default (timm) numerics
    computes slightly differently in the official code; see docs/models.md."""
    if layout not in JAX_LAYOUTS:
        raise ValueError(f"to_jax_npz: layout must be one of {tuple(JAX_LAYOUTS)}, got {layout!r}")
    sd = {k: v.detach().float().cpu().numpy() for k, v in _strip_wrapper_prefix(state_dict).items()}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"to_jax_npz: state dict has no {key!r}")
        used.add(key)
        return sd[key]

    big_vision = layout.startswith("big_vision")
    out: dict[str, np.ndarray] = {}
    if any(k.startswith(_BACKBONE) for k in sd):
        if big_vision:
            raise ValueError("to_jax_npz: big_vision's ViT has no ResNet stem; export a hybrid as 'vit_jax'")
        names = {_BACKBONE + b: a for a, b in _ROOT_NAMES}  # vitscale key -> npz key, unit by unit:
        for stage, unit in {m.groups() for k in sd if (m := _UNIT_KEY.match(k))}:
            dst, src = f"{_BACKBONE}stages.{stage}.blocks.{unit}.", f"block{int(stage) + 1}/unit{int(unit) + 1}/"
            names.update({dst + b: src + a for a, b in _UNIT_NAMES + _PROJ_NAMES if dst + b in sd})
        for ours, theirs in names.items():
            out[theirs] = take(ours).transpose(2, 3, 1, 0) if theirs.endswith("kernel") else take(ours)
    out["embedding/kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
    out["embedding/bias"] = take("patch_embed.proj.bias")
    pos = take("pos_embed")
    if "cls_token" in sd:
        cls = take("cls_token")
        if big_vision:  # no position is added to big_vision's class token: fold its row into the token
            cls, pos = cls + pos[:, :1], pos[:, 1:]
        out["cls"] = cls
    out["pos_embedding" if big_vision else _VIT_JAX_POS] = pos

    names = _BLOCK_NAMES["release" if layout == "vit_jax_release" else "linen"]
    depth = sum(1 for k in sd if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k))
    per_block = [_block_to_jax({k[len(f"blocks.{i}."):]: take(k) for k in sd if k.startswith(f"blocks.{i}.")},
                               names, num_heads, i) for i in range(depth)]
    if layout == "big_vision_scan":
        out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in per_block]) for k in per_block[0]})
    else:
        out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(per_block) for k, v in b.items()})
    out["Transformer/encoder_norm/scale"], out["Transformer/encoder_norm/bias"] = take("norm.weight"), take("norm.bias")
    for ours, theirs in (("representation.fc", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{theirs}/kernel"], out[f"{theirs}/bias"] = take(f"{ours}.weight").T, take(f"{ours}.bias")
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"to_jax_npz: {', '.join(left[:8])} have no place in the official ViT")
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    if path is not None:
        np.savez(path, **out)
    return out


def _block_to_jax(b: dict[str, np.ndarray], names: tuple[str, ...], heads: int, i: int) -> dict[str, np.ndarray]:
    ln1, mha, ln2, mlp = names
    dim = b["norm1.weight"].shape[0]
    if dim % heads:
        raise ValueError(f"to_jax_npz: width {dim} is not divisible by num_heads={heads}")
    out = {f"{ln1}/scale": b.pop("norm1.weight"), f"{ln1}/bias": b.pop("norm1.bias"),
           f"{ln2}/scale": b.pop("norm2.weight"), f"{ln2}/bias": b.pop("norm2.bias")}
    qkv_w, qkv_b = np.split(b.pop("attn.qkv.weight"), 3), np.split(b.pop("attn.qkv.bias"), 3)
    for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
        out[f"{mha}/{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
        out[f"{mha}/{name}/bias"] = bias.reshape(heads, dim // heads)
    out[f"{mha}/out/kernel"] = b.pop("attn.proj.weight").T.reshape(heads, dim // heads, dim)
    out[f"{mha}/out/bias"] = b.pop("attn.proj.bias")
    for j in (0, 1):
        out[f"{mlp}/Dense_{j}/kernel"] = b.pop(f"mlp.fc{j + 1}.weight").T
        out[f"{mlp}/Dense_{j}/bias"] = b.pop(f"mlp.fc{j + 1}.bias")
    if b:
        raise ValueError(f"to_jax_npz: blocks.{i}.{sorted(b)[0]} has no place in the official ViT (qk_norm?)")
    return out
