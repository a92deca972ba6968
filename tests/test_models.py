"""The model contract of docs/ARCHITECTURE.md: registry, config round trip, heads, checkpointing, errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitscale.models import ModelConfig, create_model, list_models


pytestmark = pytest.mark.usefixtures("single_thread")


DEMO = dict(img_size=28, patch_size=7, embed_dim=96, depth=4, num_heads=3, in_chans=1, num_classes=10)
ISSUE_NAMES = ["vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_h14",
               "r50_vit_b16", "r50_vit_l32"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_models() -> None:
    assert set(ISSUE_NAMES) <= set(list_models())


@pytest.mark.parametrize("name, paper_millions", [("vit_b16", 86), ("vit_l16", 307), ("vit_h14", 632)])
def test_parameter_counts_match_table1(name: str, paper_millions: int) -> None:
    # Counted as timm does: 1000-class head, no representation layer (the fine-tuning layout).
    with torch.device("meta"):
        model = create_model(name)
    assert _params(model) == pytest.approx(paper_millions * 1e6, rel=0.01)


def test_hybrid_shapes_follow_the_stem_stride() -> None:
    with torch.device("meta"):
        b16 = create_model("r50_vit_b16", img_size=384)
        l32 = create_model("r50_vit_l32", img_size=384)
    assert b16.grid_size == (24, 24) and b16.patch_embed.proj.kernel_size == (1, 1)
    assert b16.patch_embed.backbone.out_channels == 1024 and len(b16.patch_embed.backbone.stages) == 3
    assert l32.grid_size == (12, 12) and l32.patch_embed.backbone.out_channels == 2048
    assert b16.pos_embed.shape == (1, 24 * 24 + 1, 768)


@pytest.mark.parametrize("name, overrides", [
    ("vit_ti16", DEMO),
    ("vit_tiny_test", dict(img_size=(32, 48), pool="gap", representation_size=24, qk_norm=True, drop_path=0.1)),
    ("r50_vit_tiny_test", dict(stem_layers=[1, 1], num_classes=3)),
    ("r50_vit_tiny_test", dict(mlp_act="gelu_tanh", stem_norm="jax", posemb_resize="jax")),
])
def test_config_rebuilds_the_same_architecture(name: str, overrides: dict) -> None:
    model = create_model(name, **overrides)
    logged = json.loads(json.dumps(model.config))  # what tracking stores beside the weights
    rebuilt = create_model(**logged)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, model.cfg.in_chans, *model.cfg.img_hw)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_demo_model_outputs_and_attention_maps() -> None:
    model = create_model("vit_ti16", **DEMO).eval()
    x = torch.randn(2, 1, 28, 28)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, 96) and model.grid_size == (4, 4) and model.num_prefix_tokens == 1
    assert model(x).shape == (2, 10) and model.pre_logits(x).shape == (2, 96)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    maps = model.attention_maps(x)
    assert len(maps) == 4 and all(m.shape == (2, 3, 17, 17) for m in maps)
    torch.testing.assert_close(maps[2].sum(-1), torch.ones(2, 3, 17))
    # The explicit softmax must be the attention SDPA computes: rebuild block 0's output from it.
    block = model.blocks[0]
    h = block.norm1(model._embed(x))
    v = block.attn.qkv(h).reshape(2, 17, 3, 3, 32).permute(2, 0, 3, 1, 4)[2]
    manual = block.attn.proj((maps[0] @ v).transpose(1, 2).reshape(2, 17, 96))
    torch.testing.assert_close(manual, block.attn(h), atol=1e-5, rtol=1e-5)


def test_initialisation_follows_the_jax_code() -> None:
    model = create_model("vit_s16", img_size=64, depth=2)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    qkv = model.blocks[0].attn.qkv.weight
    bound = (6 / (384 + 384)) ** 0.5  # Xavier per query/key/value chunk, as three (D x D) JAX Dense layers
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert model(torch.randn(1, 3, 64, 64)).abs().max() == 0  # zero head: logits start at 0


def test_gap_pooling_has_no_class_token() -> None:
    model = create_model("vit_tiny_test", pool="gap").eval()
    assert model.cls_token is None and model.num_prefix_tokens == 0
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(model.pre_logits(x), tokens.mean(1))


def test_representation_layer_and_reset_head() -> None:
    model = create_model("vit_tiny_test", representation_size=32, num_classes=7)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(3, 3, 32, 32)
    feats = model.pre_logits(x)
    assert feats.shape == (3, 32) and feats.abs().max() < 1  # tanh hidden layer
    assert model(x).abs().sum() > 0

    model.reset_head(5)
    assert isinstance(model.representation, torch.nn.Identity)
    assert model.head.weight.shape == (5, 64) and torch.count_nonzero(model.head.weight) == 0
    assert model.config["num_classes"] == 5 and model.config["representation_size"] is None
    assert not any(k.startswith("representation") for k in model.state_dict())
    create_model(**model.config).load_state_dict(model.state_dict())
    model.reset_head(0)
    assert model(x).shape == (3, 64)


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_set_checkpointing_keeps_gradients(every: int) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny_test", depth=4)
    with torch.no_grad():
        model.head.weight.normal_(std=0.1)  # a zero head would zero every upstream gradient
    x = torch.randn(2, 3, 32, 32)
    reference = _grads(model, x)

    calls: list[int] = []

    def wrapped(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return checkpoint(block, h, use_reentrant=False)

    model.set_checkpointing(wrapped, every=every)
    checkpointed = _grads(model, x)
    assert len(calls) == 4 // every
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    with torch.no_grad():
        model(x)
    assert len(calls) == 4 // every  # no recomputation to save without autograd
    model.set_checkpointing(None)
    model(x)
    assert len(calls) == 4 // every


def test_stochastic_depth_and_dropout_only_in_training() -> None:
    model = create_model("vit_tiny_test", drop_path=0.5, dropout=0.2, attn_dropout=0.2)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_qk_norm_adds_per_head_layernorms() -> None:
    model = create_model("vit_tiny_test", qk_norm=True)
    assert model.blocks[0].attn.q_norm.weight.shape == (32,)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mlp_activation_option() -> None:
    x = torch.randn(4, 64) * 2
    for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        mlp = create_model("vit_tiny_test", mlp_act=act).blocks[1].mlp
        expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
        torch.testing.assert_close(mlp(x), expected, atol=0, rtol=0)
    default = create_model("vit_tiny_test")
    assert all(b.mlp.act.approximate == "none" for b in default.blocks)  # timm's exact erf GELU
    # The two forms really differ (what the official JAX checkpoints need is the tanh one).
    assert (F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_stem_norm_option() -> None:
    from vitscale.models.resnet import StdConv2dSame

    default = create_model("r50_vit_tiny_test")
    official = create_model("r50_vit_tiny_test", stem_norm="jax")
    official.load_state_dict(default.state_dict())
    convs = [m for m in official.modules() if isinstance(m, StdConv2dSame)]
    norms = [m for m in official.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 1 + 4 + 4 and all(m.eps == 1e-6 for m in norms)  # flax GroupNorm default
    w = convs[3].weight.detach()  # models_resnet.weight_standardize: (w - mean) / (std + 1e-5)
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    expected = centred / (centred.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-5)
    torch.testing.assert_close(convs[3].standardized_weight(), expected, atol=1e-6, rtol=0)
    timm_conv = [m for m in default.modules() if isinstance(m, StdConv2dSame)][3]
    assert timm_conv.eps == 1e-8 and not timm_conv.eps_on_std
    assert all(m.eps == 1e-5 for m in default.modules() if isinstance(m, torch.nn.GroupNorm))
    assert (timm_conv.standardized_weight() - expected).abs().max() > 1e-4
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        default.head.weight.normal_()
        official.head.weight.copy_(default.head.weight)
        assert (default.eval()(x) - official.eval()(x)).abs().max() > 1e-5


def test_unknown_model_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'vit_x99'.*vit_b16"):
        create_model("vit_x99")


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=30), r"img_size 30 is not divisible by patch_size 8"),
    (dict(img_size=(32, 36)), r"img_size \(32, 36\) is not divisible by patch_size 8"),
    (dict(embed_dim=65), r"embed_dim 65 is not divisible by num_heads 2"),
    (dict(pool="max"), r"pool must be one of"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
    (dict(heads=4), r"unknown override\(s\) \['heads'\].*num_heads"),
    (dict(mlp_act="relu"), r"mlp_act must be one of \('gelu', 'gelu_tanh'\), got 'relu'"),
    (dict(stem_norm="bit"), r"stem_norm must be one of \('timm', 'jax'\)"),
    (dict(posemb_resize="bilinear"), r"posemb_resize must be one of \('timm', 'jax'\)"),
])
def test_bad_config_is_one_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("vit_tiny_test", **overrides)


def test_hybrid_patch_size_must_be_a_multiple_of_the_stem_stride() -> None:
    with pytest.raises(ValueError, match=r"patch_size 8 must be a multiple of the ResNet stem stride 16"):
        ModelConfig(name="custom", img_size=64, patch_size=8, stem_layers=(3, 4, 9))


def test_wrong_image_shape_names_the_expected_one() -> None:
    model = create_model("vit_tiny_test")
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


def test_state_dict_mismatch_names_the_keys() -> None:
    model = create_model("vit_tiny_test")
    sd = model.state_dict()
    broken = {k: v for k, v in sd.items() if k != "norm.bias"} | {"blocks.9.mlp.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing keys \[norm\.bias\].*unexpected keys \[blocks\.9\.mlp\.fc1\.w"):
        model.load_state_dict(broken)
    other_head = create_model("vit_tiny_test", num_classes=3).state_dict()
    mismatch = r"shape mismatch \[head\.weight: checkpoint \(3, 64\) vs model \(10, 64\).*reset_head"
    with pytest.raises(ValueError, match=mismatch):
        model.load_state_dict(other_head)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"strip the wrapper prefix"):
        model.load_state_dict(wrapped)
    result = model.load_state_dict({k: v for k, v in other_head.items() if not k.startswith("head.")}, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]


def test_zero3_partition_placeholders_load_without_spurious_errors() -> None:
    # DeepSpeed ZeRO-3 leaves 0-element tensors in the module; its checkpoints hold the same.
    model = create_model("vit_tiny_test")
    for p in model.parameters():
        p.data = torch.empty(0)
    model.load_state_dict(model.state_dict())


@pytest.mark.parametrize("name", ["vit_tiny_test", "r50_vit_tiny_test"])
def test_bf16_weights_track_fp32(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        low = model.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)
