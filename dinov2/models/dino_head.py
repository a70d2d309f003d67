"""DINO projection head: MLP, L2 normalisation, weight-normalised prototype layer (official key layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _WeightNorm(torch.autograd.Function):
    """W = g · v / ‖v‖ (row-wise), with a backward that allocates one (out, in) tensor: autograd's, through the
    multiply and the norm, allocates four, each a 64 MiB fresh allocation for the 65536-prototype layer."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        norm = v.norm(dim=1, keepdim=True)  # (out, 1)
        ctx.save_for_backward(v, g, norm)
        return v * (g / norm)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        v, g, norm = ctx.saved_tensors
        # dL/dv = (g/‖v‖) dL/dW − g (dL/dW · v) v / ‖v‖³ ;  dL/dg = (dL/dW · v) / ‖v‖ ; row-wise dots through einsum
        dot = torch.einsum("oi,oi->o", grad_w, v).unsqueeze(1)  # (out, 1)
        grad_g = dot / norm if ctx.needs_input_grad[1] else None
        grad_v = None
        if ctx.needs_input_grad[0]:
            grad_v = grad_w * (g / norm)
            grad_v.addcmul_(v, g * dot / norm.pow(3), value=-1.0)
        return grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight W = g · v / ‖v‖ (row-wise), parameters literally ``weight_g`` and ``weight_v``.

    Same parameters, keys and output as the legacy ``torch.nn.utils.weight_norm(Linear(...), dim=0)`` used by the
    official head, but a plain module: no forward pre-hook or recomputed attribute, so deepcopy, FSDP2 and
    ``torch.compile`` see two ordinary parameters.

    Shapes: ``weight_g`` (out, 1), ``weight_v`` (out, in); forward (..., in) -> (..., out).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """v as ``nn.Linear``'s default init; g = 1 (the official head overwrites the legacy g = ‖v‖ with 1)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) weight g · v / ‖v‖ (no eps, as the legacy implementation)."""
        return _WeightNorm.apply(self.weight_v, self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """z = mlp(x); z ← z / max(‖z‖₂, eps); logits = last_layer(z), so |logit_k| ≤ |g_k|.

    Keys for ``nlayers=3`` (official layout): ``mlp.0.*``, ``mlp.2.*``, ``mlp.4.*`` (Linear, GELU between),
    ``last_layer.weight_g`` (out_dim, 1), ``last_layer.weight_v`` (out_dim, bottleneck_dim); ``nlayers=1`` gives
    ``mlp.weight``/``mlp.bias``. MLP Linear weights are trunc-normal(std 0.02) with zero biases; ``weight_v`` keeps
    the default Linear init and ``weight_g`` is 1 and trainable (DINO v1 froze it).

    Args:
        in_dim: input features D.
        out_dim: number of prototypes K.
        use_bn: BatchNorm1d after each hidden Linear (the trainer refuses BatchNorm under FSDP, as the official).
        nlayers: MLP depth, clamped to ≥ 1.
        hidden_dim: MLP hidden width.
        bottleneck_dim: MLP output width, the prototype dimension.
        mlp_bias: biases in the MLP Linears.

    Shapes: forward (..., in_dim) -> (..., out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        # the official init runs before last_layer exists, so only the MLP Linears are trunc-normal
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12  # 1e-12 underflows to 0 in fp16
        z = F.normalize(z, p=2, dim=-1, eps=eps)
        return self.last_layer(z)
