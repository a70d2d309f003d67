"""Pre-norm transformer block with LayerScale and stochastic depth, accepting one tensor or a packed list of groups.

A list input (the multi-crop "packed" forward) concatenates the tokens of all groups so that every LayerNorm and
Linear runs once on ``(sum b_i * n_i, D)`` rows, while attention stays within each sequence (see
:meth:`Attention.forward_packed`). This replaces the official xFormers-only nested-tensor path.

Stochastic depth, with ``r = drop_path`` in training:
    ``r > 0.1``: batch-subset regime (a random subset of ``max(int(b(1-r)), 1)`` samples runs the branch; the result
        is added with ``index_add`` scaled by ``b/subset``), drawn independently per group for list inputs;
    ``0 < r <= 0.1``: per-sample DropPath, per group. Unlike the official code (``# FIXME: drop_path2``) the FFN
        branch uses ``drop_path2``; both modules have the same rate so only which module is called changes.
The official nested path uses the subset regime for every ``r > 0``; here a list behaves like separate tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import DropPath, drop_add_residual_subsets
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp

Tokens = torch.Tensor | list[torch.Tensor]


def _pack(xs: list[torch.Tensor]) -> torch.Tensor:
    """``[(b_i, n_i, D)] -> (sum b_i n_i, D)``; no copy for a single group."""
    D = xs[0].shape[-1]
    return xs[0].reshape(-1, D) if len(xs) == 1 else torch.cat([x.reshape(-1, D) for x in xs])


def _unpack(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`_pack`: views of ``flat`` shaped ``(b_i, n_i, D)``."""
    D = flat.shape[-1]
    sizes = [b * n for b, n in shapes]
    return [part.view(b, n, D) for part, (b, n) in zip(flat.split(sizes), shapes)]


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
        """Apply the block to ``(B, N, D)`` or to a list of ``(b_i, n_i, D)`` groups (returns the same structure)."""
        if isinstance(x, torch.Tensor):
            return self.forward_packed([x])[0]
        return self.forward_packed(list(x))

    def forward_packed(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Packed forward of ``xs`` (each ``(b_i, n_i, D)``); equal to running each group alone (up to rounding)."""
        xs = self._add_residual(xs, self._attn_residual, self.drop_path1)
        return self._add_residual(xs, self._ffn_residual, self.drop_path2)

    def _attn_residual(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [(x.shape[0], x.shape[1]) for x in xs]
        flat = self.ls1(self.attn.forward_packed(self.norm1(_pack(xs)), shapes))
        return _unpack(flat, shapes)

    def _ffn_residual(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [(x.shape[0], x.shape[1]) for x in xs]
        return _unpack(self.ls2(self.mlp(self.norm2(_pack(xs)))), shapes)

    def _add_residual(
        self,
        xs: list[torch.Tensor],
        residual_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        drop_path: nn.Module,
    ) -> list[torch.Tensor]:
        r = self.sample_drop_ratio
        if self.training and r > 0.1:
            return drop_add_residual_subsets(xs, residual_fn, r)
        residuals = residual_fn(xs)
        if self.training and r > 0.0:
            # DropPath draws per sample, so calling it per group equals running the groups separately.
            return [x + drop_path(res) for x, res in zip(xs, residuals)]
        return [x + res for x, res in zip(xs, residuals)]


# The official name of the block class that accepts lists; ``Block`` already does.
NestedTensorBlock = Block


class BlockChunk(nn.ModuleList):
    """A run of blocks (the FSDP wrapping unit); leading ``nn.Identity`` padding keeps global block indices."""

    def forward(self, x: Tokens) -> Tokens:
        for blk in self:
            x = blk(x)
        return x
