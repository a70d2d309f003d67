"""Backbone models: the DINOv2 Vision Transformer and its architecture registry."""

from dinov2.models.registry import ARCHS, build_backbone
from dinov2.models.vision_transformer import (
    DinoVisionTransformer,
    vit_base,
    vit_custom,
    vit_giant2,
    vit_large,
    vit_small,
)

__all__ = [
    "ARCHS",
    "DinoVisionTransformer",
    "build_backbone",
    "vit_base",
    "vit_custom",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
