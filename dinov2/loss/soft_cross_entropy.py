"""Cross-entropy of student logits against soft teacher targets, with a hand-written backward.

The DINO and iBOT terms are all of this one form over K = 65536 prototypes, where every (rows, K) temporary is a
large, freshly faulted-in allocation on CPU. Autograd's ``-(t * log_softmax(s / tau)).sum(-1)`` keeps three of them
in the forward (the scaled logits, the log-probabilities, the product) and allocates three more in the backward
(one per op). Here the forward keeps two and contracts the targets with a batched dot product (einsum), and the
backward turns the saved log-probabilities into the gradient in place: no allocation at all.
"""

from __future__ import annotations

import torch


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        # fp32 at least, also under autocast (which would run einsum's bmm in the low precision)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            log_probs = torch.log_softmax(logits.to(dtype) / temp, dim=-1)
            # einsum contracts through bmm without the (rows, K) product that mul + sum (and vecdot) allocate
            loss = -torch.einsum("...k,...k->...", targets.to(dtype), log_probs)
        ctx.save_for_backward(log_probs, targets)
        ctx.temp = temp
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_probs, targets = ctx.saved_tensors
        # d/ds_k of -sum_j t_j log p_j = (p_k sum_j t_j - t_k) / tau; targets need not sum to 1 (t_1 + t_2 sums to 2)
        g = (grad_out / ctx.temp).unsqueeze(-1)  # (..., 1)
        # the saved log-probabilities serve this one backward only, so they become the gradient in place
        grad = log_probs.exp_()
        grad.mul_(targets.sum(dim=-1, keepdim=True) * g)
        grad.addcmul_(targets, g, value=-1.0)
        return grad, None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """ℓ_i = −Σ_k t_ik · log softmax(s_i / τ)_k per row, computed in fp32 (fp64 for fp64 logits).

    Args:
        logits: (..., K) student logits s (any float dtype; differentiable).
        targets: teacher targets t (no gradient), broadcastable to ``logits`` (e.g. (B, K) against (V, B, K)).
        temp: student temperature τ > 0.

    Returns:
        Per-row losses of ``logits``' leading shape (...).
    """
    if targets.requires_grad:
        raise ValueError("soft_cross_entropy: targets must not require a gradient")
    return _SoftCrossEntropy.apply(logits, targets, temp)
