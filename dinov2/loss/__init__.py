"""Losses of the DINOv2 objective: DINO (CLS token), iBOT (masked patches), KoLeo, Sinkhorn-Knopp targets, and
distillation's optional feature term."""

from dinov2.loss.center import LazyEMACenter
from dinov2.loss.dino_loss import DINOLoss, dino_crop_losses, dino_cross_entropy
from dinov2.loss.feature_distillation_loss import FeatureDistillationLoss
from dinov2.loss.ibot_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "FeatureDistillationLoss",
    "KoLeoLoss",
    "LazyEMACenter",
    "dino_crop_losses",
    "dino_cross_entropy",
    "iBOTPatchLoss",
    "sinkhorn_knopp",
]
