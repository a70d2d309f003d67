"""iBOT masked-patch self-distillation loss and its teacher targets (centering or Sinkhorn-Knopp)."""

from __future__ import annotations

import torch

from dinov2.loss.center import LazyEMACenter
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp
from dinov2.loss.soft_cross_entropy import soft_cross_entropy


class iBOTPatchLoss(LazyEMACenter):  # noqa: N801 - the official name
    """iBOT loss on the patch tokens the student saw masked.

    For masked token j (of image b(j)) with student logits s_j and teacher targets t_j (K,)::

        ℓ_j  = Σ_k t_jk · log softmax(s_j / τ_s)_k            (a negative cross-entropy)
        loss = −(1 / (2B)) Σ_j w_j · ℓ_j,    w_j = 1 / max(#masked tokens in image b(j), 1) by default

    i.e. the mean over all 2B global-crop images of each image's mean masked-token cross-entropy; images without
    masked tokens contribute 0 but count in the 2B. Buffer ``center`` (1, 1, K) is the EMA of the per-image-group
    mean of masked teacher logits (see ``LazyEMACenter``).

    Args:
        patch_out_dim: number of prototypes K.
        student_temp: student temperature τ_s.
        center_momentum: EMA momentum m of the center.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(..., K) logits -> same-shape fp32 softmax((t − c) / τ_t), after applying the pending center update."""
        return self.softmax_centered(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """(M, K) masked-token logits -> (M, K) fp32 Sinkhorn-Knopp targets over all ranks' masked tokens.

        Unlike the official code this runs without a process group. ``n_masked_patches_tensor`` (the official
        per-rank count, all-reduced there into B) does not change the result (see ``sinkhorn_knopp``), so it is
        accepted for call compatibility but not all-reduced, and never modified in place.
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Queue c ← m·c + (1−m)·(token mean of each group, averaged over groups and ranks).

        Args:
            teacher_logits: (G, M, K) groups of masked-token logits (the trainer passes G = 1, all masked tokens of
                the rank), or (M, K), read as one group. A group without tokens is skipped (the official code would
                put NaN in the center).
        """
        if teacher_logits.dim() == 2:
            teacher_logits = teacher_logits[None]
        if teacher_logits.dim() != 3:
            raise ValueError(f"teacher_logits must be (G, M, K) or (M, K), got {tuple(teacher_logits.shape)}")
        n_groups, n_tokens, n_proto = teacher_logits.shape
        if n_tokens == 0:
            self.start_center_update(teacher_logits.new_zeros(n_proto, dtype=torch.float32), 0)
        else:
            self.start_center_update(teacher_logits.float().mean(dim=1).sum(dim=0), n_groups)

    def forward_masked(
        self,
        student_masked: torch.Tensor,
        teacher_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The masked iBOT loss (see the class docstring); returns an fp32 scalar.

        Args:
            student_masked: (M, K) student logits of the masked tokens, in the order of ``student_masks_flat[mask]``
                (image-major, then token index).
            teacher_masked: (M, K) teacher targets of the same tokens.
            student_masks_flat: (2B, N) bool masks of the global crops; its first dim is the 2B denominator.
            n_masked_patches: if given, only the first ``n_masked_patches`` tokens (and weights) are used.
            masks_weight: (M,) per-token weights w_j; default 1 / max(#masked in the token's image, 1).
        """
        if student_masked.shape != teacher_masked.shape or student_masked.dim() != 2:
            raise ValueError(
                f"student {tuple(student_masked.shape)} and teacher {tuple(teacher_masked.shape)} must be equal (M, K)"
            )
        if student_masks_flat.dim() != 2:
            raise ValueError(f"student_masks_flat must be (2B, N), got {tuple(student_masks_flat.shape)}")
        token_terms = -soft_cross_entropy(student_masked, teacher_masked, self.student_temp)  # (M,) ℓ_j
        if masks_weight is None:
            masks = student_masks_flat.bool()
            per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # (2B,)
            masks_weight = per_image[:, None].expand_as(masks)[masks]  # (total masked,) image-major order
        if n_masked_patches is not None:
            token_terms = token_terms[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        if masks_weight.shape != token_terms.shape:
            raise ValueError(f"masks_weight {tuple(masks_weight.shape)} must match tokens {tuple(token_terms.shape)}")
        return -(token_terms * masks_weight).sum() / student_masks_flat.shape[0]

    # Calling the loss is forward_masked: the official dense ``forward`` variant is unused in training, so not provided.
    forward = forward_masked
