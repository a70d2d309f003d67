"""Pre-norm transformer block with LayerScale and stochastic depth, accepting one tensor, a list of groups, or
groups already packed into one tensor (:class:`PackedTokens`).

The multi-crop "packed" forward keeps the tokens of all groups in one ``(sum b_i * n_i, D)`` tensor from the first
block to the last, so that every LayerNorm and Linear runs once on all rows while attention stays within each
sequence (see :meth:`Attention.forward_packed`), and no block splits or concatenates the groups. This replaces the
official xFormers-only nested-tensor path.

Stochastic depth, with ``r = drop_path`` in training:
    ``r > 0.1``: batch-subset regime (a random subset of ``max(int(b(1-r)), 1)`` samples runs the branch; the result
        is added with ``index_add`` scaled by ``b/subset``), drawn independently per group for packed inputs;
    ``0 < r <= 0.1``: per-sample DropPath, per group. Unlike the official code (``# FIXME: drop_path2``) the FFN
        branch uses ``drop_path2``; both modules have the same rate so only which module is called changes.
The official nested path uses the subset regime for every ``r > 0``; here packed groups behave like separate tensors
(the same random draws, in group order, and the same values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import DropPath, drop_add_residual_rows
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp


class PackedTokens(NamedTuple):
    """Tokens of several groups in one tensor: ``flat`` ``(sum b_i n_i, D)``, group ``i`` its next ``b_i n_i`` rows
    (sample-major) with ``shapes[i] = (b_i, n_i)``. A NamedTuple, so module hooks that map over tensors in the
    arguments (FSDP2's input casting) see ``flat``."""

    flat: torch.Tensor
    shapes: tuple[tuple[int, int], ...]


Tokens = torch.Tensor | list[torch.Tensor] | PackedTokens


def pack(xs: list[torch.Tensor]) -> PackedTokens:
    """``[(b_i, n_i, D)] -> PackedTokens``; no copy for a single group."""
    D = xs[0].shape[-1]
    flat = xs[0].reshape(-1, D) if len(xs) == 1 else torch.cat([x.reshape(-1, D) for x in xs])
    return PackedTokens(flat, tuple((x.shape[0], x.shape[1]) for x in xs))


def unpack(tokens: PackedTokens) -> list[torch.Tensor]:
    """Inverse of :func:`pack`: views of ``tokens.flat`` shaped ``(b_i, n_i, D)``."""
    D = tokens.flat.shape[-1]
    sizes = [b * n for b, n in tokens.shapes]
    return [part.view(b, n, D) for part, (b, n) in zip(tokens.flat.split(sizes), tokens.shapes)]


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``; state-dict names as in DINOv2.

    Args:
        dim: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width is ``int(dim * mlp_ratio)``.
        qkv_bias, proj_bias, ffn_bias: biases of the attention input/output projections and of the FFN.
        drop: dropout inside the FFN and after the attention projection.
        attn_drop: attention-weight dropout.
        init_values: LayerScale init; falsy means no LayerScale (Identity, no ``ls*`` keys).
        drop_path: stochastic-depth rate ``r`` of this block.
        act_layer, norm_layer: FFN activation and norm constructors.
        attn_class, ffn_layer: attention and FFN constructors.
        attn_backend: attention backend name (see :mod:`dinov2.layers.attention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop,
            backend=attn_backend,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tokens) -> Tokens:
        """Apply the block to ``(B, N, D)``, to a list of ``(b_i, n_i, D)`` groups, or to :class:`PackedTokens`
        (returns the same structure)."""
        if isinstance(x, PackedTokens):
            return PackedTokens(self.forward_flat(x.flat, x.shapes), x.shapes)
        if isinstance(x, torch.Tensor):
            B, N, D = x.shape
            return self.forward_flat(x.reshape(B * N, D), ((B, N),)).view(B, N, D)
        return self.forward_packed(list(x))

    def forward_packed(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Packed forward of ``xs`` (each ``(b_i, n_i, D)``); equal to running each group alone (up to rounding)."""
        tokens = pack(xs)
        return unpack(PackedTokens(self.forward_flat(tokens.flat, tokens.shapes), tokens.shapes))

    def forward_flat(self, flat: torch.Tensor, shapes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The block on packed rows ``(sum b_i n_i, D)`` of groups ``shapes``; returns the same shape."""
        flat = self._add_residual(flat, shapes, self._attn_residual, self.drop_path1)
        return self._add_residual(flat, shapes, self._ffn_residual, self.drop_path2)

    def _attn_residual(self, flat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return self.ls1(self.attn.forward_packed(self.norm1(flat), shapes))

    def _ffn_residual(self, flat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(flat)))

    def _add_residual(
        self,
        flat: torch.Tensor,
        shapes: tuple[tuple[int, int], ...],
        residual_fn: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor],
        drop_path: nn.Module,
    ) -> torch.Tensor:
        r = self.sample_drop_ratio
        if self.training and r > 0.1:
            return drop_add_residual_rows(flat, shapes, residual_fn, r)
        residual = residual_fn(flat, list(shapes))
        if self.training and r > 0.0:
            residual = self._drop_samples(residual, shapes, drop_path)
        return flat + residual

    @staticmethod
    def _drop_samples(
        residual: torch.Tensor, shapes: tuple[tuple[int, int], ...], drop_path: nn.Module
    ) -> torch.Tensor:
        """Per-sample stochastic depth on packed rows: DropPath draws per sample of each group, so it is applied
        per group (as if the groups ran separately). A DropPath gives one factor per row instead of splitting."""
        if isinstance(drop_path, DropPath):
            scale = drop_path.row_scale(shapes, residual)
            return residual if scale is None else residual * scale
        groups = unpack(PackedTokens(residual, shapes))
        return torch.cat([drop_path(g).reshape(g.shape[0] * g.shape[1], -1) for g in groups])


# The official name of the block class that accepts lists; ``Block`` already does.
NestedTensorBlock = Block


class BlockChunk(nn.ModuleList):
    """A run of blocks (the FSDP wrapping unit); leading ``nn.Identity`` padding keeps global block indices."""

    def forward(self, x: Tokens) -> Tokens:
        for blk in self:
            x = blk(x)
        return x
