"""Atomic training checkpoints: everything needed to resume at exactly the next iteration.

Layout: ``<output_dir>/checkpoints/iter_<iteration:07d>/state.pth`` plus a ``COMMITTED`` marker written last. A
directory without its marker (a run killed mid-save) is never loaded and is cleaned up later. Files are written to a
temporary name, fsynced and renamed, so a torn file never carries a final name. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("dinov2")

COMMIT_MARKER = "COMMITTED"
STATE_FILE = "state.pth"
_DIR_PATTERN = re.compile(r"^iter_(\d{7,})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in types that ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _assert_finite(state: Any, path: str = "") -> None:
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not torch.isfinite(state).all():
            raise RuntimeError(f"refusing to checkpoint non-finite tensor {path}")
    elif isinstance(state, dict):
        for key, value in state.items():
            _assert_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            _assert_finite(value, f"{path}[{index}]")


def save_checkpoint(output_dir: str | Path, iteration: int, state: dict[str, Any], max_to_keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``iteration`` (the last finished iteration) and apply retention.

    Raises:
        RuntimeError: if a floating-point tensor in the model/optimizer state is not finite.
    """
    _assert_finite({k: v for k, v in state.items() if k in ("model", "optimizer")})
    root = checkpoint_root(output_dir)
    final_dir = root / f"iter_{iteration:07d}"
    if (final_dir / COMMIT_MARKER).exists():
        return final_dir
    final_dir.mkdir(parents=True, exist_ok=True)
    _fsync_write(final_dir / STATE_FILE, lambda f: torch.save(state, f))
    _fsync_write(final_dir / COMMIT_MARKER, lambda f: f.write(b"ok\n"))
    logger.info("saved checkpoint %s", final_dir)
    apply_retention(output_dir, max_to_keep)
    return final_dir


def list_valid_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _DIR_PATTERN.match(child.name)
        if match and (child / COMMIT_MARKER).is_file() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def apply_retention(output_dir: str | Path, max_to_keep: int) -> None:
    """Keep the newest ``max_to_keep`` committed checkpoints (at least one); remove uncommitted leftovers."""
    valid = list_valid_checkpoints(output_dir)
    keep = {path for _, path in valid[-max(max_to_keep, 1):]}
    newest = valid[-1][0] if valid else -1
    for child in checkpoint_root(output_dir).iterdir():
        match = _DIR_PATTERN.match(child.name)
        if not match or child in keep:
            continue
        committed = (child / COMMIT_MARKER).is_file()
        # An uncommitted directory newer than the newest valid one may be a save in progress on another rank.
        if committed or int(match.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)


def load_latest_checkpoint(output_dir: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest committed checkpoint's state, or None when there is none."""
    valid = list_valid_checkpoints(output_dir)
    if not valid:
        return None
    iteration, path = valid[-1]
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    logger.info("resuming from %s (iteration %d)", path, iteration)
    return state
