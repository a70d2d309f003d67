"""Trainer test fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread while a module's tests run (``pytest.mark.usefixtures``): with tiny tensors on a
    shared, loaded CPU, intra-op threads cost ~1000x more in barriers than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory) -> Callable[..., Path]:
    """``noise_images(n, height, width, folders=1)``: a folder of ``n`` noisy single-colour JPEGs (seeded), spread
    over ``folders`` sub-folders when there are several (any layout is an image folder for the trainer)."""

    def make(n: int, height: int, width: int, folders: int = 1) -> Path:
        root = tmp_path_factory.mktemp("images")
        rng = np.random.default_rng(0)
        for i in range(n):
            folder = root / f"part{i % folders}" if folders > 1 else root
            folder.mkdir(exist_ok=True)
            base = rng.integers(0, 255, (3,), dtype=np.uint8)
            pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.jpg")
        return root

    return make


@pytest.fixture(scope="module")
def image_folder(noise_images) -> Path:
    """24 small noisy colour JPEGs (48 x 56) in three sub-folders."""
    return noise_images(24, 48, 56, folders=3)
