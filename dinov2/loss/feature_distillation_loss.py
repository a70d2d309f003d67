"""Feature distillation: the student's tokens, projected to the teacher's width, regress the teacher's tokens.

Not part of the DINOv2 paper's distillation recipe (which keeps the DINO + iBOT objective, whose targets are the
teacher's prototype distributions); an optional extra term of this project (``distillation.feature_loss_weight``).
A teacher's prototype distributions can hold far less of what its features hold: with heads trained briefly or at
a small scale (or fitted onto a released backbone), a kNN on the teacher's softmax targets scores well below a kNN
on its CLS token, and a student that matches the targets inherits that ceiling. Regressing the features themselves
(as in FitNets, Romero et al. 2015, with the cosine distance used by e.g. the feature distillation of Wei et al.
2022, "Contrastive Learning Rivals Masked Image Modeling in Fine-tuning via Feature Distillation") carries the rest.

For student tokens s (n, D_s), the projection P (D_s -> D_t, trained with the student) and teacher tokens t
(n, D_t) of the same crops::

    L = (1/n) Σ_i (1 − cos(P s_i, t_i))          in [0, 2]; 0 when every projected token points like the teacher's

The cosine makes the term blind to the teacher's token norms (which differ between layers and models), and the
teacher's tokens are the final-norm outputs the students' kNN is scored on (``x_norm_clstoken`` and
``x_norm_patchtokens``). Computed in fp32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


class FeatureDistillationLoss(nn.Module):
    """Mean cosine distance between projected student tokens and teacher tokens; no state."""

    def forward(self, projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(n, D_t) projected student tokens and (n, D_t) teacher tokens -> fp32 scalar in [0, 2]."""
        if projected.shape != teacher.shape or projected.dim() != 2:
            raise ValueError(f"expected two (n, D) token tensors of one shape, got {tuple(projected.shape)} and "
                             f"{tuple(teacher.shape)}")
        with torch.autocast(device_type=projected.device.type, enabled=False):
            cosine = F.cosine_similarity(projected.float(), teacher.detach().float(), dim=-1, eps=_EPS)  # (n,)
            return (1.0 - cosine).mean()


__all__ = ["FeatureDistillationLoss"]
