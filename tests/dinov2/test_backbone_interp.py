"""Positional-embedding interpolation against an independent bicubic reference (official DINOv2 semantics)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2.layers import interpolate_pos_embed
from dinov2.models import vit_custom

A = -0.75  # PyTorch's bicubic convolution constant


def cubic_weights(t: float) -> list[float]:
    def near(s):  # |s| <= 1
        return ((A + 2) * s - (A + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((A * s - 5 * A) * s + 8 * A) * s - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resample_matrix(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """(n_out, n_in) bicubic weights; ``scale`` maps output to input coordinates (half-pixel centres, clamped)."""
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = scale * (o + 0.5) - 0.5
        i0 = math.floor(src)
        for j, w in enumerate(cubic_weights(src - i0)):
            W[o, min(max(i0 - 1 + j, 0), n_in - 1)] += w
    return W


def reference(pos_embed: torch.Tensor, h: int, w: int, p: int, offset: float) -> torch.Tensor:
    M = int(math.isqrt(pos_embed.shape[1] - 1))
    D = pos_embed.shape[-1]
    h0, w0 = h // p, w // p
    # scale_factor mode: PyTorch maps coordinates with 1/factor = M/(h0+off); size mode uses M/h0.
    sh, sw = (M / (h0 + offset), M / (w0 + offset)) if offset else (M / h0, M / w0)
    grid = pos_embed[0, 1:].double().reshape(M, M, D).permute(2, 0, 1)  # (D, M, M)
    out = resample_matrix(M, h0, sh) @ grid @ resample_matrix(M, w0, sw).T  # (D, h0, w0)
    return torch.cat([pos_embed[0, :1].double(), out.permute(1, 2, 0).reshape(h0 * w0, D)])[None]


@pytest.mark.parametrize("h,w", [(112, 112), (56, 84), (224, 154), (14, 14), (266, 266), (28, 350)])
@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_matches_independent_reference(h, w, offset):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 10 * 10, 8)
    out = interpolate_pos_embed(pos, h, w, 14, interpolate_offset=offset)
    assert out.shape == (1, 1 + (h // 14) * (w // 14), 8) and out.dtype == pos.dtype
    torch.testing.assert_close(out.double(), reference(pos, h, w, 14, offset), atol=2e-5, rtol=1e-5)


def test_modes_differ_and_antialias_changes_upsampling():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 16)
    offset_mode = interpolate_pos_embed(pos, 224, 224, 14, interpolate_offset=0.1)
    size_mode = interpolate_pos_embed(pos, 224, 224, 14, interpolate_offset=0.0)
    assert (offset_mode - size_mode).abs().max() > 0.1
    up = interpolate_pos_embed(pos, 560, 560, 14, interpolate_offset=0.0)
    up_aa = interpolate_pos_embed(pos, 560, 560, 14, interpolate_offset=0.0, interpolate_antialias=True)
    assert (up - up_aa).abs().max() > 1e-4
    grid = pos[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(40, 40), mode="bicubic", antialias=True)
    assert torch.equal(up_aa[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 1600, 16))


def test_model_interpolation_paths():
    model = vit_custom(embed_dim=16, depth=1, num_heads=2, patch_size=8, img_size=32, block_chunks=0)
    tok = torch.zeros(1, 17, 16)
    assert model.interpolate_pos_encoding(tok, 32, 32) is model.pos_embed  # native square grid: unchanged
    rect = model.interpolate_pos_encoding(torch.zeros(1, 1 + 4 * 8, 16), 32, 64)
    assert rect.shape == (1, 33, 16)
    torch.testing.assert_close(rect.double(), reference(model.pos_embed.detach(), 32, 64, 8, 0.1), atol=2e-5, rtol=0)
    half = model.interpolate_pos_encoding(torch.zeros(1, 17, 16, dtype=torch.bfloat16), 32, 32)
    assert half is model.pos_embed  # even for bf16 tokens, as official (the add promotes)
    low = model.interpolate_pos_encoding(torch.zeros(1, 5, 16, dtype=torch.bfloat16), 16, 16)
    assert low.dtype == torch.bfloat16
