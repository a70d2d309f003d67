"""Per-channel residual scale (LayerScale, Touvron et al. 2021, "Going deeper with image transformers")."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiply the last dimension by a learned ``gamma`` of shape ``(dim,)`` filled with ``init_values``."""

    def __init__(self, dim: int, init_values: float | torch.Tensor = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape ``(..., dim)`` times ``gamma``."""
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
