"""iBOT block masking (BEiT-style rectangles) driven by an explicit ``random.Random``.

The algorithm and its random-call order follow the official ``MaskingGenerator`` (``dinov2/data/masking.py``): with
``rng = random.Random(s)`` the masks equal the official ones under ``random.seed(s)``.
"""

from __future__ import annotations

import math
import random

import numpy as np


def official_max_num_patches(global_crops_size: int, patch_size: int) -> float:
    """``max_num_patches`` exactly as the official ``train.py`` computes it.

    The official expression ``0.5 * G // p * G // p`` parses as ``((0.5 * G) // p * G) // p`` (``*`` and ``//``
    bind equally and group left to right), not as half the patch grid: 128.0 at 224/14, 98.0 at 224/16 and 666.0 at
    518/14 (half the grid would be 128, 98 and 684.5). Use this value when mask-level compatibility with the official
    trainer matters.

    Args:
        global_crops_size: side of the global crops in pixels (G).
        patch_size: ViT patch size (p).

    Returns:
        The official (float) cap on the number of patches one masking block may add.
    """
    return 0.5 * global_crops_size // patch_size * global_crops_size // patch_size


class MaskingGenerator:
    """Block-wise mask generator for a ``(H, W)`` patch grid.

    Args:
        input_size: patch grid size, an int (square) or ``(H, W)``.
        num_masking_patches: default target used when ``__call__`` gets no count (kept for the official signature).
        min_num_patches: smallest block area drawn.
        max_num_patches: largest number of patches one block may add; None means ``num_masking_patches`` when that
            is set, else the whole grid.
        min_aspect: smallest block aspect ratio (height / width).
        max_aspect: largest block aspect ratio; None means ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size: must be positive, got {input_size}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect: must be positive, got {min_aspect}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        # The official __repr__ formats num_masking_patches with %d and crashes when it is None.
        return (
            f"{type(self).__name__}(grid={self.height}x{self.width}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"log_aspect_ratio=({self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}))"
        )

    def get_shape(self) -> tuple[int, int]:
        """The mask shape ``(H, W)``."""
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """Try (up to 10 times) to add one rectangle adding at most ``max_mask_patches`` new patches."""
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new_patches = h * w - int(block.sum())
                if 0 < new_patches <= max_mask_patches:
                    block[...] = True
                    delta += new_patches
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int | None = None, rng: random.Random | None = None) -> np.ndarray:
        """Draw a mask with at most ``num_masking_patches`` True entries.

        Args:
            num_masking_patches: target count; None uses the constructor's value (0 when that is None too).
            rng: source of randomness. Required: the global ``random`` module is never used, so masks are
                reproducible from the caller's seed alone.

        Returns:
            bool array ``(H, W)``. Its count never exceeds the target but may fall short of it.
        """
        if rng is None:
            raise ValueError("MaskingGenerator needs an explicit rng=random.Random(...)")
        target = self.num_masking_patches if num_masking_patches is None else num_masking_patches
        target = target or 0
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < target:
            delta = self._mask(mask, min(target - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask
