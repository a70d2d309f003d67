"""Multi-head self-attention with selectable backends (SDPA, xFormers, eager) and a packed multi-group path.

Backends:
    ``sdpa``: ``F.scaled_dot_product_attention`` (default; runs everywhere).
    ``xformers``: ``xformers.ops.memory_efficient_attention``; used only when xFormers imports AND the tensors are
        on CUDA, otherwise SDPA runs instead. Imported lazily on first CUDA use, never at import time.
    ``eager``: explicit ``softmax(q k^T / sqrt(d)) v``; the only path that materialises attention maps.
    ``auto``: xFormers when usable, else SDPA.

The env var ``DINOV2_ATTN_BACKEND`` overrides the constructor choice; ``XFORMERS_DISABLED`` (any value, as in the
official code) forbids xFormers.

References:
    facebookresearch/dinov2 ``dinov2/layers/attention.py`` (layout of ``qkv``: rows q | k | v, heads inside each).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "xformers", "eager")


@functools.cache
def _xformers_ops():
    """The ``xformers.ops`` module, or None when it cannot be imported (memoised: import failures are slow)."""
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a broken build raising at import
        return None
    return xops


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that actually runs for tensors on ``device``: "sdpa", "xformers" or "eager"."""
    name = check_backend(os.environ.get("DINOV2_ATTN_BACKEND") or requested)
    if name in ("auto", "xformers"):
        usable = device.type == "cuda" and "XFORMERS_DISABLED" not in os.environ and _xformers_ops() is not None
        return "xformers" if usable else "sdpa"
    return name


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention on ``(B, H, N, d)`` inputs; returns output ``(B, H, N, d)`` and weights ``(B, H, N, N)``."""
    scale = q.shape[-1] ** -0.5
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    dropped = F.dropout(attn, p=dropout_p) if dropout_p > 0 else attn
    return dropped @ v, attn


class Attention(nn.Module):
    """Multi-head self-attention: ``(B, N, D) -> (B, N, D)``; parameters ``qkv`` (D -> 3D) and ``proj`` (D -> D).

    Args:
        dim: token width ``D``.
        num_heads: ``H``; ``D`` must be divisible by it.
        qkv_bias: bias in ``qkv``.
        proj_bias: bias in ``proj``.
        attn_drop: dropout on the attention weights in training (SDPA/eager only; xFormers runs without, as official).
        proj_drop: dropout after ``proj``.
        backend: one of ``BACKENDS``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within each sample of ``x`` ``(B, N, D)``; returns ``(B, N, D)``."""
        B, N, D = x.shape
        return self.forward_packed(x.reshape(B * N, D), [(B, N)]).view(B, N, D)

    def forward_packed(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Attention over packed groups: ``qkv``/``proj`` run once on all tokens, attention runs per sequence.

        Args:
            x: ``(T, D)`` with ``T = sum(b_i * n_i)``; group ``i`` occupies the next ``b_i * n_i`` rows, sample-major.
            shapes: ``(b_i, n_i)`` per group.

        Returns:
            ``(T, D)``; sequences never attend to each other.
        """
        T, D = x.shape
        H, d = self.num_heads, self.head_dim
        qkv = self.qkv(x)  # (T, 3D)
        backend = resolve_backend(self.backend, x.device)
        if backend == "xformers":
            out = self._xformers(qkv, shapes)
        else:
            outs = []
            # split, not slicing: its backward concatenates the groups' gradients once, where each slice's
            # backward would fill a zero (T, 3D) gradient and the slices' gradients would then be summed
            groups = qkv.split([b * n for b, n in shapes]) if len(shapes) > 1 else (qkv,)
            for (b, n), rows in zip(shapes, groups):
                # (b*n, 3D) -> q, k, v (b, H, n, d) as views: unbinding the "3" dim keeps each in (b, n, H, d)
                # memory, the layout the CPU flash kernel writes its gradients in, so the backward stacks them into
                # the qkv gradient with one copy (unbinding a permuted view costs a second one)
                q, k, v = (t.transpose(1, 2) for t in rows.view(b, n, 3, H, d).unbind(2))
                o = self._attend(q, k, v, backend)  # (b, H, n, d)
                outs.append(o.transpose(1, 2).reshape(b * n, D))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj_drop(self.proj(out))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        p = self.attn_drop if self.training else 0.0
        if backend == "eager":
            return eager_attention(q, k, v, p)[0]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def _xformers(self, qkv: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        xops = _xformers_ops()
        T = qkv.shape[0]
        H, d = self.num_heads, self.head_dim
        if len(shapes) == 1:
            b, n = shapes[0]
            q, k, v = qkv.view(b, n, 3, H, d).unbind(2)  # (b, n, H, d) each: xFormers' BMHK layout
            return xops.memory_efficient_attention(q, k, v).reshape(T, H * d)
        q, k, v = qkv.view(1, T, 3, H, d).unbind(2)  # one batch-1 sequence of all tokens
        bias = xops.fmha.BlockDiagonalMask.from_seqlens([n for b, n in shapes for _ in range(b)])
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(T, H * d)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights for ``x`` ``(B, N, D)``, computed eagerly: ``(B, H, N, N)``, rows sum to 1."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return eager_attention(q, k, v)[1]


# The official name; all DINOv2 backbones are built with it. Here both backends live in one class.
MemEffAttention = Attention
