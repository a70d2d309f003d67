"""Explicit registry of backbone architectures and ``build_backbone``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dinov2.models.vision_transformer import vit_base, vit_custom, vit_giant2, vit_large, vit_small

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
    "vit_custom": vit_custom,
}


def build_backbone(arch: str, **kwargs) -> nn.Module:
    """Build ``arch`` (an ``_memeff`` suffix is accepted and ignored, as official) with constructor ``kwargs``.

    Raises:
        ValueError: for an unknown architecture name.
    """
    name = arch.removesuffix("_memeff")
    if name not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[name](**kwargs)
