"""Stochastic depth: per-sample DropPath and the batch-subset residual used by DINOv2 for drop rates above 0.1."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples of ``x`` (first dim) with probability ``drop_prob``; survivors are scaled by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (one Bernoulli draw per sample)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def subset_size(batch: int, drop_ratio: float) -> int:
    """Number of samples that keep their residual branch: ``max(int(b * (1 - r)), 1)`` (official formula)."""
    return max(int(batch * (1 - drop_ratio)), 1)


def drop_add_residual_subsets(
    xs: list[torch.Tensor],
    residual_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    drop_ratio: float,
) -> list[torch.Tensor]:
    """Batch-subset stochastic depth applied independently to each tensor of ``xs``.

    For each ``x`` of shape ``(b, N, D)`` a random permutation keeps ``subset_size(b, r)`` samples, the residual
    branch runs only on those (all groups' subsets together, in one packed call of ``residual_fn``), and the result
    is added back with ``index_add`` scaled by ``b / subset`` so the expectation is unchanged.

    Args:
        xs: tensors of shape ``(b_i, N_i, D)``.
        residual_fn: maps a list of ``(s_i, N_i, D)`` tensors to residuals of the same shapes.
        drop_ratio: ``r`` in (0, 1).

    Returns:
        Tensors of the shapes of ``xs``.
    """
    subsets, branges = [], []
    for x in xs:
        b = x.shape[0]
        brange = torch.randperm(b, device=x.device)[: subset_size(b, drop_ratio)]
        subsets.append(x[brange])
        branges.append(brange)
    residuals = residual_fn(subsets)
    out = []
    for x, brange, res in zip(xs, branges, residuals):
        b = x.shape[0]
        scale = b / brange.shape[0]
        added = torch.index_add(x.flatten(1), 0, brange, res.to(dtype=x.dtype).flatten(1), alpha=scale)
        out.append(added.view_as(x))
    return out
