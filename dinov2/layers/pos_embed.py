"""Bicubic resampling of a ViT positional embedding, reproducing the official DINOv2 ``F.interpolate`` call exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    height: int,
    width: int,
    patch_size: int,
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
) -> torch.Tensor:
    """Resample ``pos_embed`` ``(1, 1 + M*M, D)`` (class slot first) for an image of ``height x width`` pixels.

    With a truthy ``interpolate_offset`` the grid is resized with ``scale_factor=((h0 + off)/M, (w0 + off)/M)``
    (the official "0.1 offset" mode, numerically different from a size-based resize); otherwise with
    ``size=(h0, w0)``. Computation is in fp32; the result is cast back to ``pos_embed``'s dtype.

    Returns:
        ``(1, 1 + h0*w0, D)`` with ``h0 = height // p``, ``w0 = width // p``.
    """
    N = pos_embed.shape[1] - 1
    M = int(math.sqrt(N))
    if M * M != N:
        raise ValueError(f"pos_embed holds {N} patch positions, not a square grid")
    h0, w0 = height // patch_size, width // patch_size
    dtype = pos_embed.dtype
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    grid = patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
    if interpolate_offset:
        kwargs = {"scale_factor": (float(h0 + interpolate_offset) / M, float(w0 + interpolate_offset) / M)}
    else:
        kwargs = {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **kwargs)
    assert grid.shape[-2:] == (h0, w0), (grid.shape, h0, w0)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, D)
    return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)
