"""Image-to-patch embedding: (B, C, H, W) -> (B, H/p * W/p, D) with a strided convolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (state-dict names ``proj.weight``, ``proj.bias`` as in DINOv2).

    Args:
        img_size: image size the positional embedding is built for; fixes ``num_patches``.
        patch_size: patch side ``p``.
        in_chans: input channels ``C``.
        embed_dim: output width ``D``.
        norm_layer: optional norm applied to the tokens (Identity when None, as in all DINOv2 backbones).
        flatten_embedding: return ``(B, N, D)`` when True, else ``(B, H/p, W/p, D)``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x`` of shape ``(B, C, H, W)``; H and W must be multiples of the patch size (no padding)."""
        _, _, H, W = x.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        h, w = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D)
        if not self.flatten_embedding:
            x = x.reshape(-1, h, w, self.embed_dim)  # (B, H/p, W/p, D)
        return x
