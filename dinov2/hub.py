"""The eight official torch.hub backbone entry points (``dinov2_vit{s,b,l,g}14[_reg]``), offline-only.

Constructor values are those of the official ``_make_dinov2_model`` (the official ``dinov2/hub/backbones.py``).
``weights`` is a local path in any layout :mod:`dinov2.weights` reads; nothing is ever downloaded. As in the official
signature ``pretrained`` defaults to True, which here needs ``weights=PATH``: a random-init backbone is returned only
when asked for with ``pretrained=False``, never silently.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from dinov2.weights.load import load_into, load_state

_ARCH_SHORT = {"vit_small": "s", "vit_base": "b", "vit_large": "l", "vit_giant2": "g"}
_OFFICIAL_WEIGHT_NAMES = ("LVD142M", "Weights.LVD142M")  # the official ``weights`` enum, as a value or a string


def _hub_kwargs(arch: str, registers: bool) -> dict:
    """Official hub constructor values for ``arch`` (with 4 registers when ``registers``)."""
    return {
        "img_size": 518,
        "patch_size": 14,
        "init_values": 1.0,
        "ffn_layer": "swiglufused" if arch == "vit_giant2" else "mlp",
        "block_chunks": 0,
        "num_register_tokens": 4 if registers else 0,
        "interpolate_antialias": registers,
        "interpolate_offset": 0.0 if registers else 0.1,
    }


def make_hub_backbone(
    arch: str, registers: bool, weights: str | Path | None = None, pretrained: bool = True, **kwargs
) -> nn.Module:
    """Build an official hub backbone and load local weights strictly, or return it at random init when asked.

    Args:
        arch: "vit_small", "vit_base", "vit_large" or "vit_giant2".
        registers: the ``*_reg`` variant (4 register tokens, antialiased offset-free interpolation).
        weights: local checkpoint in any supported layout (hub, training, timm, HF).
        pretrained: as the official entry points (default True): load ``weights``; False: random init, only without
            ``weights``.
        **kwargs: constructor overrides. Without an explicit ``img_size``, the model takes the checkpoint's pos-embed
            grid (518 px for hub files), so nothing is resized silently. ``which="student"`` picks the student of a
            training checkpoint.

    Returns:
        The backbone, in eval mode when weights were loaded.

    Raises:
        ValueError: for a URL or the official weight name, ``pretrained=True`` without ``weights``,
            ``pretrained=False`` with ``weights``, or weights that do not match the model.
    """
    from dinov2.models.registry import build_backbone

    name = f"dinov2_vit{_ARCH_SHORT[arch]}14" + ("_reg" if registers else "")
    which = kwargs.pop("which", "teacher")
    if weights is not None and str(weights) in _OFFICIAL_WEIGHT_NAMES:
        raise ValueError(f"{name}: weights={weights} names the official download, and pretrained weights are never "
                         "downloaded; download the checkpoint first and pass weights=PATH")
    if pretrained and weights is None:
        raise ValueError(
            f"{name}: pretrained weights are never downloaded; download the checkpoint first and pass weights=PATH "
            "(any supported layout), or pass pretrained=False for a randomly initialised backbone"
        )
    if not pretrained and weights is not None:
        raise ValueError(f"{name}: pretrained=False asks for random init, but weights={weights} was given; drop one")
    state = load_state(weights, which=which) if weights is not None else None
    config = {**_hub_kwargs(arch, registers), **kwargs}
    if state is not None and "img_size" not in kwargs and "pos_embed" in state:
        side = math.isqrt(state["pos_embed"].shape[1] - 1)  # the checkpoint's own grid; nothing resized silently
        config["img_size"] = side * config["patch_size"]
    model = build_backbone(arch, **config)
    if state is not None:
        load_into(model, state)
        model.eval()
    return model


def dinov2_vits14(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-S/14 (D=384, 12 blocks), hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_small", False, weights, pretrained, **kwargs)


def dinov2_vitb14(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-B/14 (D=768, 12 blocks), hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_base", False, weights, pretrained, **kwargs)


def dinov2_vitl14(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-L/14 (D=1024, 24 blocks), hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_large", False, weights, pretrained, **kwargs)


def dinov2_vitg14(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-g/14 (D=1536, 40 blocks, SwiGLU), hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_giant2", False, weights, pretrained, **kwargs)


def dinov2_vits14_reg(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-S/14 with 4 registers, hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_small", True, weights, pretrained, **kwargs)


def dinov2_vitb14_reg(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-B/14 with 4 registers, hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_base", True, weights, pretrained, **kwargs)


def dinov2_vitl14_reg(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-L/14 with 4 registers, hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_large", True, weights, pretrained, **kwargs)


def dinov2_vitg14_reg(weights: str | Path | None = None, *, pretrained: bool = True, **kwargs) -> nn.Module:
    """ViT-g/14 with 4 registers (SwiGLU), hub configuration; see :func:`make_hub_backbone`."""
    return make_hub_backbone("vit_giant2", True, weights, pretrained, **kwargs)


__all__ = [
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "make_hub_backbone",
]
