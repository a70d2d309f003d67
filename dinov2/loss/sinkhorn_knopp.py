"""Sinkhorn-Knopp teacher targets (SwAV-style equipartition), computed in the log domain so it never overflows."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _max_over_all_samples(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Per-prototype max over the samples of every rank (all-reduced with MAX): (n, K) -> (1, K)."""
    n, k = x.shape
    if n > 0:
        shift = x.amax(dim=0, keepdim=True)  # (1, K)
    else:  # a rank without rows (e.g. no masked patches) must still join the collectives
        shift = x.new_full((1, k), float("-inf"))
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    return shift


def _logsumexp_over_all_samples(log_q: torch.Tensor, distributed: bool) -> torch.Tensor:
    """log Σ_i exp(log_q[i, k]) over the samples of every rank: (n, K) -> (1, K).

    Subtracts the per-prototype maximum (all-reduced with MAX) before ``exp``; the summand is then ≤ 1 and the
    largest one is exactly 1, so the sum neither overflows nor underflows to 0.
    """
    shift = _max_over_all_samples(log_q, distributed)
    sums = (log_q - shift).exp_().sum(dim=0, keepdim=True)  # (1, K)
    if distributed:
        dist.all_reduce(sums)
    return shift + sums.log_()


def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temperature: float,
    n_iterations: int = 3,
    n_samples_total: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher target probabilities by ``n_iterations`` Sinkhorn-Knopp steps, as the official DINOv2 code.

    Official algorithm (per rank, t (n, K), B = total rows over ranks)::

        Q = exp(t / τ)ᵀ                                       (K, n)
        Q ← Q / ΣQ                                            (total sum all-reduced)
        repeat n_iterations:
            Q ← Q / rowsum(Q) / K                             (prototype sums all-reduced)
            Q ← Q / colsum(Q) / B                             (sample sums local)
        return (Q · B)ᵀ                                       (n, K), every row sums to 1

    This computes the same quantity in the log domain. The logits are first shifted by their per-prototype max
    over all ranks (all-reduced with MAX; a per-prototype shift, like a global one, leaves the output exactly
    unchanged), then every normalisation subtracts a log-sum-exp taken after subtracting the maximum over the
    reduced dimension (again all-reduced with MAX over ranks for the prototype sums).
    The constants ΣQ, K and B are global scalars that the next normalisation divides out again, so they are
    dropped; the result is mathematically identical to the official one wherever that one is finite, and it stays
    finite for any finite logits (the official ``exp`` overflows above ≈ 88.7·τ, i.e. logits > 3.5 at τ = 0.04,
    and produces 0/0 when a whole prototype or sample underflows).

    Works without a process group. With one, every rank must call it (collectives on (1, K): 1 + 2 per iteration).

    Args:
        teacher_logits: (n, K) teacher logits of this rank's samples; any float dtype, computed in fp32.
            Ranks may hold different n (including 0).
        temperature: teacher temperature τ > 0.
        n_iterations: number of (prototype, sample) normalisation rounds, ≥ 1.
        n_samples_total: the official global row count B. The output does not depend on it (see above); it is
            accepted for signature parity with the official iBOT call and only validated.

    Returns:
        (n, K) fp32 target probabilities; each row sums to 1.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (n, K), got shape {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    if n_samples_total is not None and int(n_samples_total) < 0:
        raise ValueError(f"n_samples_total must be >= 0, got {int(n_samples_total)}")
    distributed = _distributed()
    logits = teacher_logits.detach().float()
    # Shift by the per-prototype max over all ranks before dividing by τ: this cancels exactly in the first
    # normalisation, and subtracting before the division keeps fp32 precision for large logits.
    log_q = (logits - _max_over_all_samples(logits, distributed)) / temperature  # (n, K): log of the kernel
    for _ in range(n_iterations):
        # every prototype gets the same total mass (over all ranks) ...
        log_q -= _logsumexp_over_all_samples(log_q, distributed)
        # ... then every sample becomes a distribution over prototypes (local, as the official)
        log_q -= torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp_()
