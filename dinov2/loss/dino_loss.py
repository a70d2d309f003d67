"""DINO image-level (CLS token) self-distillation loss, its teacher targets and the multi-crop term assembly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from dinov2.loss.center import LazyEMACenter
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp
from dinov2.loss.soft_cross_entropy import soft_cross_entropy


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """L(s, t) = −(1/n) Σ_i Σ_k t_ik · log softmax(s_i / τ_s)_k for s, t of shape (n, K); returns a scalar."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} differ")
    return soft_cross_entropy(student_logits, teacher_probs, student_temp).mean()


class DINOLoss(LazyEMACenter):
    """DINO loss over student×teacher pairs, with centering or Sinkhorn-Knopp teacher targets.

    For student logits s (n, K) and teacher target probabilities t (n, K)::

        L(s, t) = −(1/n) Σ_i Σ_k t_ik · log softmax(s_i / τ_s)_k

    ``forward`` returns Σ_s Σ_t L(s, t) over all given pairs; excluding same-view pairs is the caller's job (see
    ``dino_crop_losses``). Buffer ``center`` (1, K) is the EMA of teacher logits (see ``LazyEMACenter``).

    With ``queue_size`` L > 0, Sinkhorn-Knopp runs over the step's rows plus the last L teacher logit rows of
    earlier steps (SwAV's queue, Caron et al. 2020): the equipartition then spreads over L + n samples instead of
    the n of a small batch, whose K/n-fold split of every prototype forces each target over at least K/n
    prototypes. Only the step's own rows are returned. The queue holds every rank's rows (all-gathered), newest
    first, in the buffers ``queue`` (L, K) and ``queue_filled`` (saved with the model, so resume is exact); under a
    process group only rank 0 adds it to the Sinkhorn-Knopp sums, so each queued row counts once.

    Args:
        out_dim: number of prototypes K.
        student_temp: student temperature τ_s.
        center_momentum: EMA momentum m of the center.
        queue_size: L, rows of earlier teacher logits used by Sinkhorn-Knopp (0: none, the official behaviour).
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, queue_size: int = 0
    ) -> None:
        super().__init__((1, out_dim), center_momentum)
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.student_temp = student_temp
        self.queue_size = queue_size
        if queue_size:  # no buffers at all without a queue: official state dicts stay unchanged
            self.register_buffer("queue", torch.zeros(queue_size, out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(n, K) logits -> (n, K) fp32 softmax((t − c) / τ_t), after applying the pending center update."""
        return self.softmax_centered(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """(n, K) logits -> (n, K) fp32 Sinkhorn-Knopp targets (see ``sinkhorn_knopp``); the center is untouched.

        With a queue, the targets are computed over the queued rows and these together, then these rows join the
        queue (so the queue never contains the step's own rows when they are scored)."""
        if not self.queue_size:
            return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)
        logits = teacher_logits.detach().float()
        distributed = dist.is_available() and dist.is_initialized()
        past = self.queue[: int(self.queue_filled)]
        if distributed and dist.get_rank() != 0:
            past = past[:0]  # every rank holds the same queue; rank 0 alone contributes it to the global sums
        targets = sinkhorn_knopp(torch.cat((past, logits)), teacher_temp, n_iterations=n_iterations)[len(past) :]
        self.push_to_queue(logits)
        return targets

    @torch.no_grad()
    def push_to_queue(self, teacher_logits: torch.Tensor) -> None:
        """Add this step's (n, K) rows of every rank to the front of the queue, dropping the oldest beyond L."""
        rows = teacher_logits.detach().float()
        if dist.is_available() and dist.is_initialized():
            gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, rows.contiguous())  # equal n on every rank (the same per-GPU batch)
            rows = torch.cat(gathered)
        rows = rows[: self.queue_size]
        self.queue.copy_(torch.cat((rows, self.queue[: self.queue_size - len(rows)])))
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled) + len(rows)))

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Queue c ← m·c + (1−m)·mean over all ranks' rows of ``teacher_logits`` (n, K); applied at the next call."""
        if teacher_logits.dim() != 2:
            raise ValueError(f"teacher_logits must be (n, K), got shape {tuple(teacher_logits.shape)}")
        self.start_center_update(teacher_logits.float().sum(dim=0), teacher_logits.shape[0])

    def forward(
        self, student_logits_list: Sequence[torch.Tensor], teacher_probs_list: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Σ over every (student, teacher) pair of L(s, t); each tensor (n, K) with the same n. Returns a scalar."""
        if len(student_logits_list) == 0 or len(teacher_probs_list) == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher tensor")
        total = student_logits_list[0].new_zeros((), dtype=torch.float32)
        for teacher_probs in teacher_probs_list[1:]:
            if teacher_probs.shape != teacher_probs_list[0].shape:
                raise ValueError(f"teacher shapes differ: {[tuple(t.shape) for t in teacher_probs_list]}")
        # Σ_t L(s, t) = L(s, Σ_t t): one cross-entropy per student tensor against the summed targets
        summed = sum(teacher_probs_list[1:], teacher_probs_list[0])
        for student_logits in student_logits_list:
            if summed.shape != student_logits.shape:
                raise ValueError(
                    f"student {tuple(student_logits.shape)} and teacher {tuple(summed.shape)} shapes differ"
                )
            total = total + soft_cross_entropy(student_logits, summed, self.student_temp).mean()
        return total


def dino_crop_losses(
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The DINO terms of the DINOv2 objective, from head outputs, with the crop swap done here.

    With s_1, s_2 the student global-crop logits, s_v the local-crop logits, t_1, t_2 the teacher targets of
    global crops 1 and 2, and L as in ``DINOLoss``::

        T = 2 · n_local + 2                                   (the number of cross-view pairs; 18 for 8 locals)
        dino_global_crops_loss = (L(s_1, t_2) + L(s_2, t_1)) / T
        dino_local_crops_loss  = Σ_v Σ_{u∈{1,2}} L(s_v, t_u) / T   (only when n_local > 0)

    so their sum is the mean over all cross-view pairs. With 8 locals this equals the official normaliser
    (``max(2·n_local, 1) + 2`` = 18). Without locals the official normaliser would be 1 + 2 = 3 (its
    ``max(·, 1)`` guard), but it crashes earlier in the collate; here T = 2, keeping "mean over cross-view pairs".

    Args:
        student_global: (2B, K) student logits of the global crops, crop-major (all crop-1 rows, then crop 2).
        student_local: (n_local·B, K) student logits of the local crops, crop-major, or None / 0 rows.
        teacher_probs: (2B, K) teacher targets in the *natural* crop order (crop 1 then crop 2, not yet swapped).
        student_temp: student temperature τ_s.

    Returns:
        ``{"dino_global_crops_loss": scalar}`` plus ``"dino_local_crops_loss"`` when there are local crops.
    """
    if student_global.dim() != 2 or student_global.shape[0] % 2:
        raise ValueError(f"student_global must be (2B, K), got shape {tuple(student_global.shape)}")
    if teacher_probs.shape != student_global.shape:
        raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)} must match {tuple(student_global.shape)}")
    batch, n_proto = student_global.shape[0] // 2, student_global.shape[1]
    n_local = 0
    if student_local is not None and student_local.shape[0] > 0:
        if student_local.dim() != 2 or student_local.shape[1] != n_proto or student_local.shape[0] % batch:
            raise ValueError(f"student_local must be (n_local*{batch}, {n_proto}), got {tuple(student_local.shape)}")
        n_local = student_local.shape[0] // batch
    n_terms = 2 * n_local + 2

    teacher_1, teacher_2 = teacher_probs.chunk(2)  # (B, K) each
    swapped = torch.cat((teacher_2, teacher_1))  # student crop 1 learns from teacher crop 2 and vice versa
    # L over the 2B stacked rows is the mean of the two pair losses, hence the factor 2
    losses = {"dino_global_crops_loss": dino_cross_entropy(student_global, swapped, student_temp) * 2 / n_terms}
    if n_local > 0:
        # Σ_u L(s_v, t_u) = −(1/B) Σ_i Σ_k (t_1 + t_2)_ik log p_vik, then summed over the local crops v
        per_row = soft_cross_entropy(student_local.view(n_local, batch, n_proto), teacher_1 + teacher_2, student_temp)
        losses["dino_local_crops_loss"] = per_row.mean(dim=-1).sum() / n_terms
    return losses
