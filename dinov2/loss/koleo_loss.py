"""KoLeo regulariser: the Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., ICLR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-8


class KoLeoLoss(nn.Module):
    """Spreads features uniformly on the sphere by pushing every point away from its nearest neighbour.

    For x (B, D)::

        x̂_i  = x_i / max(‖x_i‖₂, 1e-8)
        j(i) = argmax_{j ≠ i} x̂_i · x̂_j                        (nearest neighbour on the sphere)
        d_i  = ‖x̂_i − x̂_{j(i)} + 1e-8‖₂
        L    = −(1/B) Σ_i log(d_i + 1e-8)

    Always computed in fp32 with autocast disabled (the official code keeps the input dtype, where the 1e-8 terms
    underflow in fp16 and a duplicate row gives ``inf``). Here a duplicate pair gives a large finite value,
    −log(1e-8·(√D + 1)) ≈ 15.4 for D = 384. For B = 1 there is no neighbour and the estimator is undefined; this
    returns 0 (fp32, still attached to the graph), where the official fp32 code returns that same duplicate value
    with a zero gradient. The diagonal of x̂x̂ᵀ is excluded with −inf, not the official −1 (see ``forward``). The loss
    is per rank: nothing is gathered.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features (any float dtype) -> fp32 scalar loss."""
        if x.dim() != 2:
            raise ValueError(f"KoLeoLoss expects (B, D) features, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.shape[0] < 2:
                return x.sum() * 0.0
            x = F.normalize(x, p=2, dim=-1, eps=_EPS)
            with torch.no_grad():  # only the argmax is needed: no (B, B) graph
                dots = x @ x.t()  # (B, B) cosine similarities
                # never pick yourself; the official fills −1, which ties with an antipodal neighbour, and argmax
                # may then pick the point itself (on CPU, x = [[0,1],[0,−1]] gives 8.4 instead of −log 2)
                dots.fill_diagonal_(float("-inf"))
                neighbour = dots.argmax(dim=1)  # (B,)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=_EPS)  # (B,)
            return -torch.log(distances + _EPS).mean()
