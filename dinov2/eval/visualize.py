"""Attention and PCA visualisations of a backbone, written as one PNG grid per image.

CLI: ``python -m dinov2.eval.visualize --weights W --images a.jpg b.png ... --output-dir D [--image-size 448]
[--threshold 0.6] [--no-pca-mask]``.

Each image is resized (short side, bicubic) and centre-cropped to ``S x S``; ``S`` must be a multiple of the patch
size (the grid is ``S/p x S/p`` patches; the positional embedding is interpolated). The PNG ``D/<stem>.png`` is
``(1 + H) * S`` wide and ``2 * S`` high, for H attention heads:
  - top row: the input, then each head's last-block attention from the CLS token to the patches (per-head min-max,
    viridis-like colours, nearest-upsampled to pixels, as DINO's ``visualize_attention.py``);
  - bottom row: the PCA map (first 3 principal components of the last block's normed patch tokens as RGB, each
    min-max scaled; with the mask, background patches are black and the PCA is refitted on the foreground, as in
    the DINOv2 demos), then per head the input kept where the head's top patches hold ``threshold`` of the CLS
    attention mass and darkened elsewhere (DINO's thresholded variant).
The foreground is where the first component is positive, its sign chosen so that the border patches (usually
background) are mostly negative.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from dinov2.eval.datasets import IMAGENET_MEAN, IMAGENET_STD
from dinov2.eval.features import pick_device
from dinov2.io.cli import add_model_arguments, run_cli, tool_parser

logger = logging.getLogger("dinov2")

# Five anchors of matplotlib's viridis, interpolated linearly (no matplotlib dependency).
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def check_image_size(image_size: int, patch_size: int) -> None:
    """Raise a one-line ValueError unless ``image_size`` is a positive multiple of ``patch_size``."""
    if image_size <= 0 or image_size % patch_size:
        lower = max(patch_size, image_size // patch_size * patch_size)
        raise ValueError(
            f"--image-size {image_size} is not a multiple of the patch size {patch_size}; try {lower} or "
            f"{lower + patch_size}"
        )


def load_square(path: str | Path, image_size: int) -> Image.Image:
    """RGB image resized (short side = ``image_size``, bicubic) and centre-cropped to ``image_size`` square.

    Raises:
        ValueError: naming the file, for a missing or non-regular file, a non-image, or more pixels than Pillow's
            decompression-bomb bound (checked from the header, before anything is decoded).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'not a regular file' if path.exists() else 'no such image file'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns below twice its bound
            with Image.open(path) as image:
                image = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: refused as a decompression bomb ({str(error).split('. ')[0]})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError) as error:  # truncated or broken image data
        raise ValueError(f"{path}: cannot decode the image ({type(error).__name__}: {error})") from None
    w, h = image.size
    scale = image_size / min(w, h)
    image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def to_model_input(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ImageNet-normalised ``(1, 3, S, S)`` float32."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-block attention of the CLS token to each patch ``(heads, N)`` for one image ``x`` ``(1, 3, S, S)``."""
    attn = model.get_last_self_attention(x)  # (1, heads, T, T), T = 1 + R + N
    return attn[0, :, 0, 1 + model.num_register_tokens :].float()


def threshold_mass(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row of ``attention`` ``(heads, N)``, True on the largest patches that hold ``threshold`` of its mass.

    As DINO: sort ascending, normalise, keep the patches whose cumulative mass exceeds ``1 - threshold``.
    """
    values, order = attention.sort(dim=1)
    cumulative = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1)
    keep_sorted = cumulative > 1 - threshold
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def _principal_components(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Projections ``(n, k)`` of ``x`` ``(n, D)`` on its first k principal axes (zeros where rank is short)."""
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (min(n, D), D)
    proj = centred @ vh[:k].T
    return torch.nn.functional.pad(proj, (0, k - proj.shape[1]))


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each column of ``x`` ``(n, c)`` to [0, 1] (a constant column becomes 0)."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def pca_rgb(patch_tokens: torch.Tensor, grid: int, mask_background: bool = True) -> np.ndarray:
    """PCA colours of patch tokens ``(N, D)`` on a ``grid x grid`` layout -> ``(grid, grid, 3)`` float in [0, 1]."""
    tokens = patch_tokens.float()
    proj = _principal_components(tokens)
    first = proj[:, 0].view(grid, grid)
    border = torch.cat([first[0], first[-1], first[1:-1, 0], first[1:-1, -1]])
    if border.mean() > 0:  # orient so that the (mostly background) border is negative
        proj[:, 0] = -proj[:, 0]
    rgb = torch.zeros(tokens.shape[0], 3)
    foreground = proj[:, 0] > 0 if mask_background else torch.ones(tokens.shape[0], dtype=torch.bool)
    if int(foreground.sum()) >= 3:
        refit = _principal_components(tokens[foreground]) if mask_background else proj
        rgb[foreground] = _minmax(refit)
    return rgb.view(grid, grid, 3).numpy()


def _colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``(h, w)`` -> uint8 RGB ``(h, w, 3)`` with the viridis anchors."""
    positions = np.linspace(0.0, 1.0, len(_VIRIDIS))
    channels = [np.interp(values, positions, _VIRIDIS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _upsample(array: np.ndarray, size: int) -> Image.Image:
    """``(g, g)`` or ``(g, g, 3)`` uint8 -> nearest-upsampled ``size x size`` image (one block per patch)."""
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


@torch.no_grad()
def visualize_image(model: nn.Module, image: Image.Image, threshold: float = 0.6, mask_background: bool = True):
    """The PNG grid (module docstring) for one square image whose side is a multiple of the patch size."""
    size = image.size[0]
    check_image_size(size, model.patch_size)
    grid = size // model.patch_size
    device = next(model.parameters()).device
    x = to_model_input(image).to(device)
    attention = cls_attention(model, x).cpu()  # (heads, N)
    patches = model.forward_features(x)["x_norm_patchtokens"][0].cpu()  # (N, D)
    heads = attention.shape[0]
    canvas = Image.new("RGB", ((1 + heads) * size, 2 * size))
    canvas.paste(image, (0, 0))
    canvas.paste(_upsample((pca_rgb(patches, grid, mask_background) * 255).round().astype(np.uint8), size), (0, size))
    image_array = np.asarray(image, dtype=np.float32)
    kept = threshold_mass(attention, threshold).view(heads, grid, grid).numpy()
    for h in range(heads):
        amap = _minmax(attention[h].view(-1, 1)).view(grid, grid).numpy()
        canvas.paste(_upsample(_colormap(amap), size), ((1 + h) * size, 0))
        mask = np.asarray(_upsample(kept[h].astype(np.uint8) * 255, size), dtype=np.float32)[..., None] / 255.0
        shown = image_array * (0.2 + 0.8 * mask)  # darken, not hide, what falls outside the kept mass
        canvas.paste(Image.fromarray(shown.round().astype(np.uint8)), ((1 + h) * size, size))
    return canvas


def visualize_files(
    model: nn.Module,
    images: list[str | Path],
    output_dir: str | Path,
    image_size: int = 448,
    threshold: float = 0.6,
    mask_background: bool = True,
) -> list[Path]:
    """Write one grid PNG per input image into ``output_dir``; returns their paths (input order)."""
    check_image_size(image_size, model.patch_size)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, path in enumerate(images):
        stem = Path(path).stem
        target = out / f"{stem}.png"
        if target in written:  # same file name from different folders
            target = out / f"{stem}_{i}.png"
        grid = visualize_image(model, load_square(path, image_size), threshold, mask_background)
        grid.save(target)
        written.append(target)
        logger.info("wrote %s", target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m dinov2.eval.visualize", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, nargs="+")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-size", type=int, default=448, help="square side; a multiple of the patch size")
    parser.add_argument("--threshold", type=float, default=0.6, help="attention mass kept in the thresholded maps")
    parser.add_argument("--no-pca-mask", action="store_true", help="colour every patch, background included")
    return parser


def _run(args: argparse.Namespace) -> None:
    from dinov2.weights import load_backbone

    model = load_backbone(args.weights, num_heads=args.num_heads).to(pick_device(args.device))
    paths = visualize_files(model, args.images, args.output_dir, args.image_size, args.threshold,
                            not args.no_pca_mask)
    print("\n".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
