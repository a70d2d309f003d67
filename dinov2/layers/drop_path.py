"""Stochastic depth: per-sample DropPath and the batch-subset residual used by DINOv2 for drop rates above 0.1."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    def row_scale(self, shapes: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor | None:
        """The per-row factor ``(sum b_i n_i, 1)`` of packed groups ``(b_i, n_i)``, or None when nothing drops.

        Draws exactly what :func:`drop_path` draws on each group in turn (one Bernoulli per sample, in
        ``like``'s dtype), so ``packed_rows * row_scale`` equals calling the module per group, bit for bit,
        without splitting the packed tensor and concatenating the results.
        """
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep_prob = 1.0 - self.drop_prob
        scales = []
        for b, n in shapes:
            keep = like.new_empty((b, 1, 1)).bernoulli_(keep_prob)
            if keep_prob > 0.0:
                keep.div_(keep_prob)
            scales.append(keep.expand(b, n, 1).reshape(b * n, 1))
        return scales[0] if len(scales) == 1 else torch.cat(scales)


def subset_size(batch: int, drop_ratio: float) -> int:
    """Number of samples that keep their residual branch: ``max(int(b * (1 - r)), 1)`` (official formula)."""
    return max(int(batch * (1 - drop_ratio)), 1)


def drop_add_residual_rows(
    flat: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    residual_fn: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor],
    drop_ratio: float,
) -> torch.Tensor:
    """Batch-subset stochastic depth on packed groups, applied independently to each group.

    ``flat`` ``(sum b_i n_i, D)`` holds group ``i`` as its next ``b_i n_i`` rows, sample-major. Per group a random
    permutation keeps ``subset_size(b_i, r)`` samples; the residual branch runs once on the kept rows of all groups
    (gathered with one ``index_select``), and each group's result is added back to its rows with ``index_add``
    scaled by ``b_i / subset`` so the expectation is unchanged. The permutations are drawn group by group, as
    running the groups one after the other would.

    Args:
        flat: packed tokens ``(T, D)``.
        shapes: ``(b_i, n_i)`` per group.
        residual_fn: maps packed kept rows and their ``(s_i, n_i)`` shapes to residuals of the same shape.
        drop_ratio: ``r`` in (0, 1).

    Returns:
        A tensor shaped like ``flat``.
    """
    rows, kept_shapes, scales, start = [], [], [], 0
    for b, n in shapes:
        brange = torch.randperm(b, device=flat.device)[: subset_size(b, drop_ratio)]
        tokens = torch.arange(n, device=flat.device)
        rows.append((start + brange[:, None] * n + tokens).reshape(-1))  # the kept samples' rows, sample-major
        kept_shapes.append((brange.shape[0], n))
        scales.append(b / brange.shape[0])
        start += b * n
    index = rows[0] if len(rows) == 1 else torch.cat(rows)
    residuals = residual_fn(flat.index_select(0, index), kept_shapes).to(dtype=flat.dtype)
    out = flat.clone()  # one copy; every group is then added into it in place
    for group_rows, res, scale in zip(rows, residuals.split([s * n for s, n in kept_shapes]), scales):
        out.index_add_(0, group_rows, res, alpha=scale)
    return out


def drop_add_residual_subsets(
    xs: list[torch.Tensor],
    residual_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    drop_ratio: float,
) -> list[torch.Tensor]:
    """:func:`drop_add_residual_rows` for a list of ``(b_i, N_i, D)`` tensors (the same draws and results).

    ``residual_fn`` maps a list of ``(s_i, N_i, D)`` tensors to residuals of the same shapes.
    """
    D = xs[0].shape[-1]
    shapes = [(x.shape[0], x.shape[1]) for x in xs]

    def packed_fn(kept: torch.Tensor, kept_shapes: list[tuple[int, int]]) -> torch.Tensor:
        groups = [g.view(s, n, D) for g, (s, n) in zip(kept.split([s * n for s, n in kept_shapes]), kept_shapes)]
        return torch.cat([r.reshape(-1, D) for r in residual_fn(groups)])

    flat = torch.cat([x.reshape(-1, D) for x in xs])
    out = drop_add_residual_rows(flat, shapes, packed_fn, drop_ratio)
    return [part.view_as(x) for part, x in zip(out.split([b * n for b, n in shapes]), xs)]
