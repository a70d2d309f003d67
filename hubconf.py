"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "dinov2_vits14", source="local", weights=PATH)``, offline."""

dependencies = ["torch"]

from dinov2.hub import (  # noqa: E402
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)

__all__ = [
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
]
