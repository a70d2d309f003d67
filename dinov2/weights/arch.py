"""Backbone architecture read off a canonical state dict, the official key/shape table, and model construction."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch
from torch import nn

from dinov2.weights.formats import count_blocks, strip_wrappers, to_canonical, unchunk

# (embed_dim, depth) → factory name in the official dinov2/models/vision_transformer.py.
_OFFICIAL_ARCHS = {(384, 12): "vit_small", (768, 12): "vit_base", (1024, 24): "vit_large", (1536, 40): "vit_giant2"}
_ARCH_DIMS = {name: dims for dims, name in _OFFICIAL_ARCHS.items()}
HEAD_DIM = 64  # every official DINOv2 ViT uses 64-dim heads
# Widths of the official archs: only there does the head count follow from the weights (D / 64); any other width
# needs an architecture record or a user-named head count.
OFFICIAL_WIDTHS = frozenset(dim for dim, _ in _OFFICIAL_ARCHS)


def swiglu_hidden(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of the official SwiGLUFFNFused: int(h·2/3) rounded up to a multiple of 8 (4096 for ViT-g)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class BackboneSpec:
    """The architecture of a DinoVisionTransformer: what its state dict fixes, plus what it does not (the head count
    and the pos-embed interpolation settings; ``None`` there means the official hub default for the register count).

    Every checkpoint and export this project writes records one (:meth:`to_record`), and every loader rebuilds the
    model from it, so a model trained with a non-official head size reloads with the attention it was trained with.
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    mlp_ratio: float = 4.0
    layerscale: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    in_chans: int = 3
    interpolate_offset: float | None = None
    interpolate_antialias: bool | None = None

    def to_record(self) -> dict:
        """Plain-typed dict of every field (what checkpoints, safetensors metadata and sidecar files hold)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping, source: str = "architecture record") -> BackboneSpec:
        """Inverse of :meth:`to_record`.

        Raises:
            ValueError: one line naming ``source`` and the field, for an unknown, missing or mistyped field.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: expected a mapping of architecture fields, got {type(record).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown architecture field(s) {unknown}")
        values = {}
        for name, f in known.items():
            if name not in record:
                if f.default is MISSING:
                    raise ValueError(f"{source}: architecture field {name!r} is missing")
                continue
            values[name] = _checked_field(name, record[name], str(f.type), source)
        spec = cls(**values)
        if min(spec.embed_dim, spec.num_heads, spec.depth, spec.patch_size, spec.img_size) < 1:
            raise ValueError(f"{source}: embed_dim, num_heads, depth, patch_size and img_size must be >= 1")
        if spec.embed_dim % spec.num_heads:
            raise ValueError(f"{source}: embed_dim {spec.embed_dim} is not divisible by num_heads {spec.num_heads}")
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_record(), sort_keys=True)

    @property
    def grid(self) -> int:
        """Side of the square positional-embedding grid."""
        return self.img_size // self.patch_size

    @property
    def arch(self) -> str:
        """Official factory name when (embed_dim, depth) match one, else "vit_custom"."""
        return _OFFICIAL_ARCHS.get((self.embed_dim, self.depth), "vit_custom")

    def hub_defaults(self) -> dict:
        """Official hub constructor values (``_make_dinov2_model`` in dinov2/hub/backbones.py): LayerScale 1.0, flat
        blocks, and the interpolation mode of register (offset 0, antialias) vs non-register (offset 0.1) models."""
        registers = self.num_register_tokens > 0
        offset, antialias = self.interpolate_offset, self.interpolate_antialias
        return {
            "init_values": 1.0 if self.layerscale else None,
            "block_chunks": 0,
            "interpolate_antialias": registers if antialias is None else antialias,
            "interpolate_offset": (0.0 if registers else 0.1) if offset is None else offset,
        }

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``build_backbone(self.arch, **kwargs)`` reproducing this spec with hub defaults."""
        kwargs = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "num_register_tokens": self.num_register_tokens,
            "ffn_layer": self.ffn_layer,
            "qkv_bias": self.qkv_bias,
            "proj_bias": self.proj_bias,
            "ffn_bias": self.ffn_bias,
            **self.hub_defaults(),
        }
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        if self.mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = self.mlp_ratio
        if self.arch == "vit_custom" or self.num_heads != self.embed_dim // HEAD_DIM:
            # an official width with another head count is built as vit_custom too (see ``build_from_spec``)
            kwargs.update(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        return kwargs


def _checked_field(name: str, value, annotation: str, source: str):
    """``value`` converted to the field's type; JSON gives ints for floats and nothing else may slip through."""
    if value is None and "None" in annotation:
        return None
    if annotation.startswith("bool"):
        ok = isinstance(value, bool)
    elif annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{source}: architecture field {name!r} has a bad value {value!r} (expected {annotation})")
    return value


def official_num_heads(embed_dim: int) -> int:
    """Heads of an official-width backbone (D / 64).

    Raises:
        ValueError: for any other width, where the weights alone cannot tell the head count.
    """
    if embed_dim not in OFFICIAL_WIDTHS:
        raise ValueError(
            f"cannot tell the attention head count of a {embed_dim}-wide backbone from its weights alone (no "
            f"architecture record, and {embed_dim} is not an official width {sorted(OFFICIAL_WIDTHS)}); name it "
            "with --num-heads N (num_heads=N in Python), or re-export the file with "
            "`python -m dinov2.weights.export --num-heads N` to record it"
        )
    return embed_dim // HEAD_DIM


def infer_spec(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> BackboneSpec:
    """Read the architecture off a canonical (flat official) state dict.

    Args:
        state: canonical backbone state dict (tensors or meta tensors; only shapes are read).
        num_heads: heads when known from elsewhere (an architecture record, an HF config.json, the user); default
            embed_dim // 64 for the official widths (384, 768, 1024, 1536), an error for any other width.

    Raises:
        ValueError: if required keys are missing, the pos-embed grid is not square, or the head count is unknown.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        if key not in state:
            raise ValueError(f"cannot infer the architecture: key {key!r} is missing")
    dim = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    n_pos = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid")
    if "blocks.0.mlp.w12.weight" in state:
        ffn, hidden = "swiglufused", state["blocks.0.mlp.w3.weight"].shape[1]
        ratio = 4.0 if hidden == swiglu_hidden(dim) else None
        if ratio is None:
            raise ValueError(
                f"SwiGLU hidden width {hidden} does not match an mlp_ratio of 4 (expected {swiglu_hidden(dim)})"
            )
    elif "blocks.0.mlp.fc1.weight" in state:
        ffn, ratio = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    else:
        ffn, ratio = "identity", 4.0
    if num_heads is None:
        num_heads = official_num_heads(dim)
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the embedding width {dim}")
    return BackboneSpec(
        embed_dim=dim,
        depth=count_blocks(state),
        num_heads=num_heads,
        patch_size=proj.shape[-1],
        img_size=grid * proj.shape[-1],
        num_register_tokens=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        ffn_layer=ffn,
        mlp_ratio=float(ratio),
        layerscale="blocks.0.ls1.gamma" in state,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in state) or ffn == "identity",
        in_chans=proj.shape[1],
    )


def shape_fields_differ(recorded: BackboneSpec, inferred: BackboneSpec) -> list[str]:
    """Fields the weights fix on which a record and the weights' own shapes disagree (as ``name record/weights``)."""
    skip = {"num_heads", "interpolate_offset", "interpolate_antialias"}
    return [
        f"{f.name} {getattr(recorded, f.name)}/{getattr(inferred, f.name)}"
        for f in fields(BackboneSpec)
        if f.name not in skip and getattr(recorded, f.name) != getattr(inferred, f.name)
    ]


def spec_of_module(backbone: nn.Module) -> BackboneSpec:
    """The full architecture of a live backbone (any block_chunks, wrapped or sharded: only shapes are read)."""
    shapes = dict(backbone.named_parameters())
    spec = infer_spec(to_canonical(unchunk(strip_wrappers(shapes))), num_heads=int(backbone.num_heads))
    return replace(
        spec,
        interpolate_offset=float(backbone.interpolate_offset),
        interpolate_antialias=bool(backbone.interpolate_antialias),
    )


def official_shapes(spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
    """The official canonical key → shape table for ``spec``, in the order of the released hub checkpoints."""
    d, h = spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + spec.grid**2, d)}
    if spec.num_register_tokens:
        shapes["register_tokens"] = (1, spec.num_register_tokens, d)
    shapes["mask_token"] = (1, d)
    shapes["patch_embed.proj.weight"] = (d, spec.in_chans, spec.patch_size, spec.patch_size)
    shapes["patch_embed.proj.bias"] = (d,)
    if spec.ffn_layer == "mlp":
        ffn = {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (d, h), "fc2.bias": (d,)}
    elif spec.ffn_layer in ("swiglu", "swiglufused"):
        s = swiglu_hidden(d, spec.mlp_ratio)
        ffn = {"w12.weight": (2 * s, d), "w12.bias": (2 * s,), "w3.weight": (d, s), "w3.bias": (d,)}
    else:
        ffn = {}
    if not spec.ffn_bias:
        ffn = {k: v for k, v in ffn.items() if not k.endswith(".bias")}
    for i in range(spec.depth):
        b = f"blocks.{i}."
        shapes[b + "norm1.weight"] = shapes[b + "norm1.bias"] = (d,)
        shapes[b + "attn.qkv.weight"] = (3 * d, d)
        if spec.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        shapes[b + "attn.proj.weight"] = (d, d)
        if spec.proj_bias:
            shapes[b + "attn.proj.bias"] = (d,)
        if spec.layerscale:
            shapes[b + "ls1.gamma"] = (d,)
        shapes[b + "norm2.weight"] = shapes[b + "norm2.bias"] = (d,)
        shapes.update({b + "mlp." + k: v for k, v in ffn.items()})
        if spec.layerscale:
            shapes[b + "ls2.gamma"] = (d,)
    shapes["norm.weight"] = shapes["norm.bias"] = (d,)
    return shapes


def build_from_spec(spec: BackboneSpec, **overrides) -> nn.Module:
    """Build the backbone for ``spec`` with hub defaults; ``overrides`` replace any constructor argument."""
    from dinov2.models.registry import build_backbone  # the model package is optional for pure conversions

    kwargs = {**spec.model_kwargs(), **overrides}
    arch = spec.arch if "num_heads" not in kwargs else "vit_custom"
    return build_backbone(arch, **kwargs)
