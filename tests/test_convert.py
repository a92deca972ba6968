"""timm and JAX interop: same logits from the same weights, round trips, loud failures.

No pretrained weights are downloadable here, so every test copies *random* weights; timm's own npz
reader (`model.load_pretrained`) is the independent reference for the JAX layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vitscale.models import create_model
from vitscale.models.convert import JaxCheckpointError, from_jax_npz, from_timm, to_timm


pytestmark = pytest.mark.usefixtures("single_thread")


TINY = dict(img_size=32, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (timm's zero head / unit norms would hide layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.1 if p.ndim == 1 else 0.02) * noise)
    return model.eval()


def _timm_random(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # skip timm's init: every value is overwritten anyway
        model = timm.create_model(name, pretrained=False, **kwargs)
    return _randomise(model.to_empty(device="cpu"))


def _ours_from(state_dict: dict, name: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    model.load_state_dict(state_dict, assign=True)  # materialises the meta model with these tensors
    return model.eval()


@pytest.mark.parametrize("timm_name, ours, overrides, batch", [
    ("vit_tiny_patch16_224", "vit_ti16", {}, 2),
    ("vit_base_r50_s16_384", "r50_vit_b16", dict(img_size=384), 1),  # 67 GMACs: one image is enough
    ("vit_tiny_r_s16_p8_224", "vit_ti16", dict(stem_layers=(), patch_size=32), 2),  # stem-only hybrid
])
def test_timm_weights_give_timm_logits(timm_name: str, ours: str, overrides: dict, batch: int) -> None:
    reference = _timm_random(timm_name)
    model = _ours_from(from_timm(reference.state_dict()), ours, **overrides)
    x = torch.randn(batch, 3, *model.cfg.img_hw)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two zero heads
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    exported = to_timm(model.state_dict())
    original = reference.state_dict()
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    reference.load_state_dict(exported)  # strict


def test_from_timm_rejects_features_we_do_not_implement() -> None:
    with torch.device("meta"):
        avg_pool = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=r"cannot map.*fc_norm\.weight"):
        from_timm(avg_pool.state_dict())
    sd = {"module.cls_token": torch.zeros(1, 1, 8), "module.reg_token": torch.zeros(1, 4, 8),
          "module.blocks.0.ls1.gamma": torch.ones(8)}
    with pytest.raises(ValueError, match=r"reg_token, blocks\.0\.ls1\.gamma"):
        from_timm(sd)


def test_legacy_timm_pre_logits_and_to_timm_refuses_it() -> None:
    converted = from_timm({"pre_logits.fc.weight": torch.ones(3, 3), "head.bias": torch.zeros(2)})
    assert set(converted) == {"representation.fc.weight", "head.bias"}
    model = create_model("vit_tiny_test", representation_size=16)
    with pytest.raises(ValueError, match=r"representation \(pre-logits\) layer.*reset_head"):
        to_timm(model.state_dict())
    model.reset_head(10)
    assert "representation.fc.weight" not in to_timm(model.state_dict())


# ---- JAX npz -----------------------------------------------------------------------------------
def _jax_arrays(rng: np.random.Generator, *, dim: int, depth: int, heads: int, patch: int, tokens: int,
                classes: int, stem_layers: tuple[int, ...] | None = None, representation: int | None = None,
                prefix: str = "") -> dict[str, np.ndarray]:
    """Random arrays with the names and shapes of google-research/vision_transformer checkpoints."""
    a: dict[str, np.ndarray] = {}

    def put(key: str, *shape: int, scale: bool = False) -> None:
        noise = rng.standard_normal(shape).astype(np.float32)
        a[prefix + key] = 1 + 0.1 * noise if scale else 0.05 * noise

    def norm(key: str, width: int) -> None:
        put(f"{key}/scale", width, scale=True)
        put(f"{key}/bias", width)

    embed_in = 3 * patch * patch
    if stem_layers is not None:
        put("conv_root/kernel", 7, 7, 3, 64)
        norm("gn_root", 64)
        prev = 64
        for s, units in enumerate(stem_layers, start=1):
            out = 256 * 2 ** (s - 1)
            for u in range(1, units + 1):
                cin, unit = (prev if u == 1 else out), f"block{s}/unit{u}/"
                for k, (kh, i, o) in enumerate([(1, cin, out // 4), (3, out // 4, out // 4), (1, out // 4, out)], 1):
                    put(f"{unit}conv{k}/kernel", kh, kh, i, o)
                    norm(f"{unit}gn{k}", o)
                if u == 1:
                    put(f"{unit}conv_proj/kernel", 1, 1, cin, out)
                    norm(f"{unit}gn_proj", out)
            prev = out
        patch, embed_in = 1, prev
    put("embedding/kernel", patch, patch, embed_in // (patch * patch) if stem_layers is None else embed_in, dim)
    put("embedding/bias", dim)
    put("cls", 1, 1, dim)
    put("Transformer/posembed_input/pos_embedding", 1, tokens, dim)
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        norm(f"{b}LayerNorm_0", dim)
        for name in ("query", "key", "value"):
            put(f"{b}MultiHeadDotProductAttention_1/{name}/kernel", dim, heads, dim // heads)
            put(f"{b}MultiHeadDotProductAttention_1/{name}/bias", heads, dim // heads)
        put(f"{b}MultiHeadDotProductAttention_1/out/kernel", heads, dim // heads, dim)
        put(f"{b}MultiHeadDotProductAttention_1/out/bias", dim)
        norm(f"{b}LayerNorm_2", dim)
        put(f"{b}MlpBlock_3/Dense_0/kernel", dim, 4 * dim)
        put(f"{b}MlpBlock_3/Dense_0/bias", 4 * dim)
        put(f"{b}MlpBlock_3/Dense_1/kernel", 4 * dim, dim)
        put(f"{b}MlpBlock_3/Dense_1/bias", dim)
    norm("Transformer/encoder_norm", dim)
    if representation:
        put("pre_logits/kernel", dim, representation)
        put("pre_logits/bias", representation)
    put("head/kernel", representation or dim, classes)
    put("head/bias", classes)
    return a


@pytest.mark.parametrize("hybrid", [False, True])
def test_npz_loads_like_timm_loads_it(tmp_path: Path, hybrid: bool) -> None:
    rng = np.random.default_rng(0)
    if hybrid:
        arrays = _jax_arrays(rng, dim=64, depth=2, heads=2, patch=16, tokens=1 + 2 * 2, classes=10,
                             stem_layers=(3, 4, 9))
        timm_name, ours, overrides = "vit_base_r50_s16_384", "r50_vit_b16", TINY
    else:
        arrays = _jax_arrays(rng, dim=64, depth=2, heads=2, patch=8, tokens=1 + 4 * 4, classes=10)
        timm_name, ours, overrides = "vit_tiny_patch16_224", "vit_ti16", dict(TINY, patch_size=8)
    path = tmp_path / "ViT.npz"
    np.savez(path, **arrays)

    reference = _timm_random(timm_name, **overrides)
    reference.load_pretrained(str(path))  # timm's reader of the original checkpoints
    model = _ours_from(from_jax_npz(path), ours, **overrides)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_npz_prefix_and_pre_logits() -> None:
    arrays = _jax_arrays(np.random.default_rng(1), dim=64, depth=2, heads=2, patch=8, tokens=17, classes=10,
                         representation=48, prefix="opt/target/")
    model = _ours_from(from_jax_npz(arrays), "vit_tiny_test", representation_size=48)
    assert model.pre_logits(torch.randn(1, 3, 32, 32)).shape == (1, 48)
    pre = arrays["opt/target/pre_logits/kernel"]
    torch.testing.assert_close(model.representation.fc.weight, torch.from_numpy(pre.T.copy()))
    query = arrays["opt/target/Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight[:64], torch.from_numpy(query.reshape(64, 64).T.copy()))


def test_npz_errors_name_the_array(tmp_path: Path) -> None:
    # One JaxCheckpointError (a ValueError) per problem; tests/test_jax_official.py covers the layouts.
    arrays = _jax_arrays(np.random.default_rng(2), dim=64, depth=1, heads=2, patch=8, tokens=17, classes=10)
    missing = {k: v for k, v in arrays.items() if k != "Transformer/encoder_norm/scale"}
    with pytest.raises(JaxCheckpointError, match=r"missing 'Transformer/encoder_norm/scale' \(read as vit_jax_release"):
        from_jax_npz(missing)
    extra = dict(arrays, **{"Transformer/encoderblock_0/LayerScale/gamma": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected 'Transformer/encoderblock_0/LayerScale/gamma': no place"):
        from_jax_npz(extra)
    with pytest.raises(JaxCheckpointError, match=r"not a ViT checkpoint"):
        from_jax_npz({"foo": np.zeros(1)})
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        from_jax_npz(tmp_path / "nope.npz")
