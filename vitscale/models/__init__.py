"""The ViT model family (pure PyTorch; no engine, tracking or launcher imports)."""
from vitscale.models.flops import macs_per_image
from vitscale.models.posembed import resample_pos_embed
from vitscale.models.registry import ModelConfig, list_models, model_config
from vitscale.models.vit import create_model
from vitscale.models.vit import VisionTransformer

__all__ = [
    "ModelConfig",
    "VisionTransformer",
    "create_model",
    "macs_per_image",
    "list_models",
    "model_config",
    "resample_pos_embed",
]
