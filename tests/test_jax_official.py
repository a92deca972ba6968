"""Official JAX checkpoints, exactly: every layout the official savers write loads, and the loaded
model computes what the official Flax code computes.

There is no JAX here and no released weight file, so each test writes an npz itself with the key names
and shapes of the official savers (as read in google-research/vision_transformer `models_vit.py`,
`models_resnet.py`, `checkpoint.py` and big_vision `models/vit.py`), and `_official_forward` below
re-implements the official forward pass in float64 numpy: tanh GELU (`flax.linen.gelu`), LayerNorm
and GroupNorm eps 1e-6, `weight_standardize` = (w - mean) / (std + 1e-5), TF "SAME" padding.
vitscale's fp32 logits must match it to 1e-5, and must *not* match it with timm's numerics (so the
options are shown to matter, and the comparison to be able to fail).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from vitscale.models import create_model
from vitscale.models.convert import (
    OFFICIAL_NUMERICS, JaxCheckpointError, from_jax_npz, jax_npz_config, jax_npz_layout, to_jax_npz)

pytestmark = pytest.mark.usefixtures("single_thread")

# Encoder-block layer names per official generation, written out independently of vitscale's table.
BLOCK_NAMES = {
    "vit_jax_release": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "vit_jax": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
    "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
    "big_vision_scan": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
DIM, DEPTH, HEADS, MLP_DIM, CLASSES, PATCH, IMG = 32, 2, 2, 80, 5, 8, 32


# ---- an npz as the official savers write it ------------------------------------------------------
def _official_npz(seed: int, layout: str, *, pool: str = "token", stem: tuple[int, ...] | None = None,
                  legacy_gn: bool = False, rep: int | None = None, grid: int = IMG // PATCH) -> dict[str, np.ndarray]:
    """Random parameters under the official names and shapes (flattened with '/', as np.savez gets them)."""
    rng = np.random.default_rng(seed)
    a: dict[str, np.ndarray] = {}

    def kernel(key: str, *shape: int, fan_in: int) -> None:
        a[key] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

    def vector(key: str, *shape: int, scale: float = 0.1) -> None:
        a[key] = (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(key: str, width: int) -> None:
        shape = (1, 1, 1, width) if legacy_gn else (width,)  # flax < 0.3.6 GroupNorm params: (1, 1, 1, C)
        a[f"{key}/scale"] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        vector(f"{key}/bias", *shape)

    channels, patch = 3, PATCH
    if stem is not None:  # vit_jax models_vit.VisionTransformer(resnet=...): root + ResNetStage(s)
        kernel("conv_root/kernel", 7, 7, 3, 64, fan_in=49 * 3)
        norm("gn_root", 64)
        channels = 64
        for s, units in enumerate(stem, start=1):
            features = 64 * 2 ** (s - 1)
            for u in range(1, units + 1):
                unit = f"block{s}/unit{u}/"
                if u == 1:
                    kernel(unit + "conv_proj/kernel", 1, 1, channels, 4 * features, fan_in=channels)
                    norm(unit + "gn_proj", 4 * features)
                kernel(unit + "conv1/kernel", 1, 1, channels, features, fan_in=channels)
                kernel(unit + "conv2/kernel", 3, 3, features, features, fan_in=9 * features)
                kernel(unit + "conv3/kernel", 1, 1, features, 4 * features, fan_in=features)
                for k, width in ((1, features), (2, features), (3, 4 * features)):
                    norm(f"{unit}gn{k}", width)
                channels = 4 * features
        patch = PATCH // (4 * 2 ** max(len(stem) - 1, 0))
    kernel("embedding/kernel", patch, patch, channels, DIM, fan_in=patch * patch * channels)
    vector("embedding/bias", DIM)
    token = pool == "token"
    if token:
        vector("cls", 1, 1, DIM, scale=0.5)
    if layout.startswith("big_vision"):  # added before the class token: no row for it
        vector("pos_embedding", 1, grid * grid, DIM, scale=0.5)
    else:
        vector("Transformer/posembed_input/pos_embedding", 1, grid * grid + token, DIM, scale=0.5)
    ln1, mha, ln2, mlp = BLOCK_NAMES[layout]
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        for n in (ln1, ln2):
            a[f"{b}{n}/scale"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
            vector(f"{b}{n}/bias", DIM)
        for n in ("query", "key", "value"):
            kernel(f"{b}{mha}/{n}/kernel", DIM, HEADS, DIM // HEADS, fan_in=DIM)
            vector(f"{b}{mha}/{n}/bias", HEADS, DIM // HEADS)
        kernel(f"{b}{mha}/out/kernel", HEADS, DIM // HEADS, DIM, fan_in=DIM)
        vector(f"{b}{mha}/out/bias", DIM)
        kernel(f"{b}{mlp}/Dense_0/kernel", DIM, MLP_DIM, fan_in=DIM)
        vector(f"{b}{mlp}/Dense_0/bias", MLP_DIM)
        kernel(f"{b}{mlp}/Dense_1/kernel", MLP_DIM, DIM, fan_in=MLP_DIM)
        vector(f"{b}{mlp}/Dense_1/bias", DIM)
    if layout == "big_vision_scan":  # nn.scan over the blocks: one stacked array per parameter
        for key in [k for k in a if k.startswith("Transformer/encoderblock_0/")]:
            rest = key[len("Transformer/encoderblock_0/"):]
            a[f"Transformer/encoderblock/{rest}"] = np.stack(
                [a.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(DEPTH)])
    a["Transformer/encoder_norm/scale"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
    vector("Transformer/encoder_norm/bias", DIM)
    if rep:
        kernel("pre_logits/kernel", DIM, rep, fan_in=DIM)
        vector("pre_logits/bias", rep)
    kernel("head/kernel", rep or DIM, CLASSES, fan_in=(rep or DIM) / 4)
    vector("head/bias", CLASSES)
    return a


# ---- the official forward pass, in float64 numpy --------------------------------------------------
def _conv(x: np.ndarray, k: np.ndarray, stride: int, same: bool) -> np.ndarray:
    """NHWC x HWIO convolution; TF 'SAME' puts the odd padding cell at the bottom/right."""
    kh, kw = k.shape[:2]
    if same:
        (h, w) = x.shape[1:3]
        ph = max((-(-h // stride) - 1) * stride + kh - h, 0)
        pw = max((-(-w // stride) - 1) * stride + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + stride * oh:stride, j:j + stride * ow:stride] @ k[i, j]
    return out


def _std_conv(x: np.ndarray, k: np.ndarray, stride: int = 1) -> np.ndarray:
    k = k - k.mean(axis=(0, 1, 2))
    return _conv(x, k / (k.std(axis=(0, 1, 2)) + 1e-5), stride, same=True)  # models_resnet.weight_standardize


def _group_norm(x: np.ndarray, a: dict, key: str) -> np.ndarray:
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, 32, c // 32)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    return g.reshape(x.shape) * a[f"{key}/scale"].reshape(-1) + a[f"{key}/bias"].reshape(-1)


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _resnet(x: np.ndarray, a: dict, stem: tuple[int, ...]) -> np.ndarray:
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(_group_norm(_std_conv(x, a["conv_root/kernel"], 2), a, "gn_root"))
    h, w = x.shape[1:3]  # 3x3/2 'SAME' max pool: -inf padding
    ph, pw = max((-(-h // 2) - 1) * 2 + 3 - h, 0), max((-(-w // 2) - 1) * 2 + 3 - w, 0)
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=-np.inf)
    oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    x = np.max([x[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=0)
    for s, units in enumerate(stem, start=1):
        for u in range(1, units + 1):
            p, stride = f"block{s}/unit{u}/", 2 if (s > 1 and u == 1) else 1
            residual = x
            if u == 1:
                residual = _group_norm(_std_conv(x, a[p + "conv_proj/kernel"], stride), a, p + "gn_proj")
            y = relu(_group_norm(_std_conv(x, a[p + "conv1/kernel"]), a, p + "gn1"))
            y = relu(_group_norm(_std_conv(y, a[p + "conv2/kernel"], stride), a, p + "gn2"))
            y = _group_norm(_std_conv(y, a[p + "conv3/kernel"]), a, p + "gn3")
            x = relu(residual + y)
    return x


def _official_forward(arrays: dict, layout: str, images: torch.Tensor, *, pool: str,
                      stem: tuple[int, ...] | None = None) -> np.ndarray:
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x = images.double().permute(0, 2, 3, 1).numpy()
    if stem is not None:
        x = _resnet(x, a, stem)
    p = a["embedding/kernel"].shape[0]
    x = _conv(x, a["embedding/kernel"], p, same=False) + a["embedding/bias"]
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    cls = np.tile(a["cls"], (n, 1, 1)) if pool == "token" else np.zeros((n, 0, d))
    if layout.startswith("big_vision"):  # posemb first, then the class token
        x = np.concatenate([cls, x + a["pos_embedding"]], axis=1)
    else:
        x = np.concatenate([cls, x], axis=1) + a["Transformer/posembed_input/pos_embedding"]
    ln1, mha, ln2, mlp = BLOCK_NAMES[layout]
    for i in range(DEPTH):
        if layout == "big_vision_scan":
            p = {k[len("Transformer/encoderblock/"):]: v[i] for k, v in a.items() if "encoderblock/" in k}
        else:
            p = {k[len(f"Transformer/encoderblock_{i}/"):]: v for k, v in a.items() if f"encoderblock_{i}/" in k}
        y = _layer_norm(x, p[f"{ln1}/scale"], p[f"{ln1}/bias"])
        q, k, v = (np.einsum("btd,dhk->bthk", y, p[f"{mha}/{m}/kernel"]) + p[f"{mha}/{m}/bias"]
                   for m in ("query", "key", "value"))
        logits = np.einsum("bqhk,bthk->bhqt", q / math.sqrt(q.shape[-1]), k)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = np.einsum("bhqt,bthk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", y, p[f"{mha}/out/kernel"]) + p[f"{mha}/out/bias"]
        y = _layer_norm(x, p[f"{ln2}/scale"], p[f"{ln2}/bias"])
        y = _gelu_tanh(y @ p[f"{mlp}/Dense_0/kernel"] + p[f"{mlp}/Dense_0/bias"])
        x = x + y @ p[f"{mlp}/Dense_1/kernel"] + p[f"{mlp}/Dense_1/bias"]
    x = _layer_norm(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    x = x[:, 0] if pool == "token" else x.mean(axis=1)
    if "pre_logits/kernel" in a:
        x = np.tanh(x @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return x @ a["head/kernel"] + a["head/bias"]


def _load(source, **overrides) -> torch.nn.Module:
    model = create_model("vit_tiny_test", **{**jax_npz_config(source), **overrides})
    model.load_state_dict(from_jax_npz(source))  # strict
    return model.eval()


def _max_diff(model: torch.nn.Module, expected: np.ndarray, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(np.abs(model(images).double().numpy() - expected).max())


IMAGES = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


# ---- plain ViTs: every layout, both pools, every prefix --------------------------------------------
@pytest.mark.parametrize("layout, pool, prefix, rep", [
    ("vit_jax_release", "token", "", None),
    ("vit_jax_release", "token", "opt/target/", 24),  # a flax.optim training-state file
    ("vit_jax", "token", "", None),
    ("vit_jax", "gap", "", 24),
    ("big_vision", "token", "", None),  # pool_type "tok"
    ("big_vision", "gap", "params/", None),
    ("big_vision_scan", "token", "", None),
])
def test_official_layouts_give_the_official_logits(tmp_path: Path, layout: str, pool: str, prefix: str,
                                                   rep: int | None) -> None:
    arrays = _official_npz(1, layout, pool=pool, rep=rep)
    path = tmp_path / "ckpt.npz"
    extra = {"opt/state/step": np.zeros(())} if prefix else {}  # optimizer state beside the weights
    np.savez(path, **{prefix + k: v for k, v in arrays.items()}, **extra)
    expected = _official_forward(arrays, layout, IMAGES, pool=pool)
    assert np.abs(expected).max() > 0.5  # a meaningful comparison

    assert jax_npz_layout(path) == layout
    config = jax_npz_config(path)
    sizes = (config["embed_dim"], config["depth"], config["num_heads"], config["patch_size"])
    assert sizes == (DIM, DEPTH, HEADS, PATCH)
    assert int(DIM * config["mlp_ratio"]) == MLP_DIM and config["pool"] == pool and config["representation_size"] == rep
    assert _max_diff(_load(path), expected, IMAGES) < 1e-5
    # timm's numerics (exact GELU) on the same weights do not reproduce the official logits.
    assert _max_diff(_load(path, mlp_act="gelu"), expected, IMAGES) > 2e-5


# ---- R50 hybrids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stem, legacy_gn", [((1, 1), False), ((1, 1), True), ((), False)])
def test_hybrid_gives_the_official_logits(tmp_path: Path, stem: tuple[int, ...], legacy_gn: bool) -> None:
    arrays = _official_npz(2, "vit_jax", stem=stem, legacy_gn=legacy_gn)
    expected = _official_forward(arrays, "vit_jax", IMAGES, pool="token", stem=stem)
    assert np.abs(expected).max() > 0.5
    config = jax_npz_config(arrays)
    assert config["stem_layers"] == stem and config["patch_size"] == PATCH and config["stem_norm"] == "jax"
    assert _max_diff(_load(arrays), expected, IMAGES) < 1e-5
    if stem:  # timm's weight standardisation and GroupNorm eps do not reproduce them
        assert _max_diff(_load(arrays, stem_norm="timm"), expected, IMAGES) > 2e-5


# ---- fine-tuning at a higher resolution with the official resize -----------------------------------
@pytest.mark.parametrize("layout, pool", [("vit_jax_release", "token"), ("big_vision", "token"), ("vit_jax", "gap")])
def test_fine_tune_resolution_uses_the_official_zoom(layout: str, pool: str) -> None:
    arrays = _official_npz(3, layout, pool=pool)
    model = _load(arrays, img_size=48)  # grid 4x4 -> 6x6, as 224 -> 384 for a /16 model
    # What the official loader does: scipy.ndimage.zoom(order=1) on the grid, class-token row kept.
    key = "pos_embedding" if layout.startswith("big_vision") else "Transformer/posembed_input/pos_embedding"
    pos = arrays[key]
    head = 1 if (pool == "token" and key != "pos_embedding") else 0
    grid = pos[0, head:].reshape(4, 4, DIM)
    zoomed = scipy.ndimage.zoom(grid, (6 / 4, 6 / 4, 1), order=1).reshape(1, 36, DIM)
    resized = dict(arrays, **{key: np.concatenate([pos[:, :head], zoomed], axis=1)})
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert _max_diff(model, _official_forward(resized, layout, images, pool=pool), images) < 1e-5
    timm_resize = _load(arrays, img_size=48, posemb_resize="timm")
    assert _max_diff(timm_resize, _official_forward(resized, layout, images, pool=pool), images) > 1e-4


# ---- export: vitscale -> official npz -> vitscale --------------------------------------------------
@pytest.mark.parametrize("layout, pool, stem", [
    ("vit_jax", "token", None), ("vit_jax_release", "gap", None), ("big_vision", "token", None),
    ("big_vision_scan", "gap", None), ("vit_jax", "token", (1, 1)),
])
def test_export_round_trip(tmp_path: Path, layout: str, pool: str, stem: tuple[int, ...] | None) -> None:
    reference = _official_npz(4, layout, pool=pool, stem=stem, rep=16)
    model = _load(reference)  # realistic weights, official numerics
    path = tmp_path / "export.npz"
    arrays = to_jax_npz(model.state_dict(), model.cfg.num_heads, path, layout=layout)
    with np.load(path) as saved:  # exactly the official saver's names and shapes
        assert {k: saved[k].shape for k in saved.files} == {k: v.shape for k, v in reference.items()}
        assert all(saved[k].dtype == np.float32 for k in saved.files)
    # The official code would compute what vitscale computes from the exported file ...
    expected = _official_forward(arrays, layout, IMAGES, pool=pool, stem=stem)
    assert _max_diff(model, expected, IMAGES) < 1e-5
    # ... and the file loads back to the same weights (the class-token row big_vision folds away).
    back = _load(path)
    if layout.startswith("big_vision") and pool == "token":
        assert torch.count_nonzero(back.pos_embed[:, 0]) == 0
        torch.testing.assert_close(back.cls_token, model.cls_token + model.pos_embed[:, :1], atol=0, rtol=0)
    else:
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    assert _max_diff(back, expected, IMAGES) < 1e-5


def test_export_refuses_what_the_official_models_lack() -> None:
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.k_norm\.bias has no place in the official ViT"):
        to_jax_npz(create_model("vit_tiny_test", qk_norm=True).state_dict(), 2)
    with pytest.raises(ValueError, match=r"big_vision's ViT has no ResNet stem"):
        to_jax_npz(create_model("r50_vit_tiny_test").state_dict(), 2, layout="big_vision")
    with pytest.raises(ValueError, match=r"layout must be one of"):
        to_jax_npz(create_model("vit_tiny_test").state_dict(), 2, layout="timm")


# ---- one clear line for everything else -----------------------------------------------------------
def _error(arrays: dict) -> str:
    with pytest.raises(JaxCheckpointError) as info:
        from_jax_npz(arrays)
    message = str(info.value)
    assert "\n" not in message and "known layouts: vit_jax_release, vit_jax, big_vision, big_vision_scan" in message
    return message


def test_errors_name_the_first_bad_key_and_the_known_layouts() -> None:
    linen = _official_npz(5, "vit_jax")
    missing = {k: v for k, v in linen.items() if "encoderblock_1/MlpBlock_0/Dense_1/bias" not in k}
    assert "missing 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias' (read as vit_jax;" in _error(missing)
    extra = dict(linen, **{"Transformer/encoderblock_0/LayerScale_0/gamma": np.ones(DIM, np.float32),
                           "zz/extra": np.ones(1, np.float32)})
    assert "unexpected 'Transformer/encoderblock_0/LayerScale_0/gamma' (+1 more)" in _error(extra)
    rename = ("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
    # block 1 renamed, block 0 not: not one consistent layout
    mixed = {(k.replace(*rename) if "encoderblock_1/" in k else k): v for k, v in linen.items()}
    assert "missing 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel'" in _error(mixed)
    bv = _official_npz(5, "big_vision", pool="gap")
    assert "MAPHead_0/probe" in _error(dict(bv, **{"MAPHead_0/probe": np.zeros((1, 1, DIM), np.float32)}))
    assert "sincos2d" in _error({k: v for k, v in bv.items() if k != "pos_embedding"})
    assert "not a ViT checkpoint" in _error({"foo": np.zeros(1)})
    bf16 = dict(linen, **{"head/bias": np.zeros(CLASSES, np.dtype("V2"))})
    assert "'head/bias' has dtype |V2 (bfloat16?)" in _error(bf16)


def test_official_numerics_preset_is_what_the_adapter_sets() -> None:
    config = jax_npz_config(_official_npz(6, "big_vision"))
    assert {k: config[k] for k in OFFICIAL_NUMERICS} == OFFICIAL_NUMERICS
    model = create_model("vit_tiny_test", **config)
    assert model.blocks[0].mlp.act.approximate == "tanh" and model.posemb_resize == "jax"


if __name__ == "__main__":  # the parity figures of docs/models.md
    torch.set_num_threads(1)
    for layout, pool in [("vit_jax_release", "token"), ("vit_jax", "token"), ("vit_jax", "gap"),
                         ("big_vision", "token"), ("big_vision", "gap"), ("big_vision_scan", "token")]:
        arrays = _official_npz(1, layout, pool=pool)
        expected = _official_forward(arrays, layout, IMAGES, pool=pool)
        print(f"{layout:16s} {pool:5s} official numerics {_max_diff(_load(arrays), expected, IMAGES):.1e}, "
              f"timm GELU {_max_diff(_load(arrays, mlp_act='gelu'), expected, IMAGES):.1e}")
    for stem in ((1, 1), ()):
        arrays = _official_npz(2, "vit_jax", stem=stem)
        expected = _official_forward(arrays, "vit_jax", IMAGES, pool="token", stem=stem)
        timm = _max_diff(_load(arrays, stem_norm="timm", mlp_act="gelu"), expected, IMAGES)
        print(f"hybrid {stem!s:6s} official numerics {_max_diff(_load(arrays), expected, IMAGES):.1e}, "
              f"timm stem norm {_max_diff(_load(arrays, stem_norm='timm'), expected, IMAGES):.1e}, timm all {timm:.1e}")
