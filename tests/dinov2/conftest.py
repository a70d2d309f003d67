"""Trainer test fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 small noisy colour JPEGs in three sub-folders (any layout is an image folder for the trainer)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        base = rng.integers(0, 255, (3,), dtype=np.uint8)
        pixels = np.clip(base + rng.normal(0, 40, (48, 56, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i}.jpg")
    return root
