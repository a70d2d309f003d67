"""Backbone building blocks: patch embedding, attention, FFNs, transformer block, stochastic depth, LayerScale."""

from dinov2.layers.attention import BACKENDS, Attention, MemEffAttention, eager_attention, resolve_backend
from dinov2.layers.block import Block, BlockChunk, NestedTensorBlock, PackedTokens, pack, unpack
from dinov2.layers.drop_path import (
    DropPath,
    drop_add_residual_rows,
    drop_add_residual_subsets,
    drop_path,
    subset_size,
)
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.layers.patch_embed import PatchEmbed
from dinov2.layers.pos_embed import interpolate_pos_embed
from dinov2.layers.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

__all__ = [
    "BACKENDS",
    "Attention",
    "Block",
    "BlockChunk",
    "DropPath",
    "LayerScale",
    "MemEffAttention",
    "Mlp",
    "NestedTensorBlock",
    "PackedTokens",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "drop_add_residual_rows",
    "drop_add_residual_subsets",
    "drop_path",
    "eager_attention",
    "interpolate_pos_embed",
    "pack",
    "resolve_backend",
    "subset_size",
    "unpack",
]
