"""Atomic training checkpoints: everything needed to resume at exactly the next iteration.

Layout: ``<output_dir>/checkpoints/iter_<iteration:07d>/`` plus a ``COMMITTED`` marker written last. A directory
without its marker (a run killed mid-save) is never loaded and is cleaned up later. Its content is one of:

- single file (one process without a process group): ``state.pth``, the whole state in one ``torch.save``. Files are
  written atomically (:mod:`dinov2.io.atomic`), so a torn file never carries a final name.
- sharded (any run with a process group): a ``torch.distributed.checkpoint`` (DCP) folder (``.metadata`` plus one
  ``__<rank>_0.distcp`` per rank) holding ``model`` and ``optimizer`` under their parameter names, plus one
  ``extras_rank<r>.pt`` per rank (RNG, loader position, counters). Rank 0 writes the marker after a barrier that
  follows every rank's writes. DCP reshards at load time, so a run may resume at another world size.

Both layouts load into any world size and strategy (see ``dinov2.train.state.restore_training_state``). Loading uses
``weights_only=True``; DCP itself gives no compatibility guarantee across torch versions.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2.io.atomic import write_atomic, write_bytes_atomic

logger = logging.getLogger("dinov2")

COMMIT_MARKER = "COMMITTED"
STATE_FILE = "state.pth"
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint once every rank's shard is written
EXTRAS_FILE = "extras_rank{rank}.pt"
_DIR_PATTERN = re.compile(r"^iter_(\d{7,})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


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
    write_atomic(final_dir / STATE_FILE, lambda f: torch.save(state, f))
    size = (final_dir / STATE_FILE).stat().st_size  # checked on load: a truncated file is found before unpickling
    write_bytes_atomic(final_dir / COMMIT_MARKER, f"ok\nstate_bytes={size}\n".encode())
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
        has_state = (child / STATE_FILE).is_file() or (child / DCP_METADATA).is_file()
        if match and (child / COMMIT_MARKER).is_file() and has_state:
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


def verify_checkpoint(path: str | Path) -> None:
    """Cheap integrity check of a committed single-file checkpoint: its size against the one its marker recorded.

    Raises:
        ValueError: naming the file, when it is shorter or longer than when it was committed.
    """
    path = Path(path)
    marker = (path / COMMIT_MARKER).read_text(errors="replace")
    match = re.search(r"state_bytes=(\d+)", marker)
    if match and (path / STATE_FILE).is_file():
        size = (path / STATE_FILE).stat().st_size
        if size != int(match.group(1)):
            raise ValueError(f"{path / STATE_FILE} has {size} bytes, {match.group(1)} when committed")


def quarantine_checkpoint(path: str | Path) -> Path:
    """Rename an unloadable checkpoint to ``iter_<n>.corrupt[.<k>]``: kept for inspection, never loaded, listed or
    removed by retention again, and its iteration is free to be saved anew."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    k = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt.{k}")
        k += 1
    path.rename(target)
    return target


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest committed checkpoint directory (either layout), or None."""
    valid = list_valid_checkpoints(output_dir)
    return valid[-1][1] if valid else None


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a DCP directory, False for a single-file ``state.pth`` checkpoint."""
    return not (Path(path) / STATE_FILE).is_file()


def load_latest_checkpoint(output_dir: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest committed single-file checkpoint's state, or None when there is none.

    Raises:
        ValueError: the newest one is sharded (load it with :func:`load_sharded_checkpoint`).
    """
    valid = list_valid_checkpoints(output_dir)
    if not valid:
        return None
    iteration, path = valid[-1]
    if is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded (DCP) checkpoint; load it with load_sharded_checkpoint")
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    logger.info("resuming from %s (iteration %d)", path, iteration)
    return state


def _local_tensors(state: Any) -> Any:
    """The same nesting with every DTensor replaced by this rank's shard (what this rank writes)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: _local_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_local_tensors(v) for v in state]
    return state


def save_sharded_checkpoint(output_dir: str | Path, iteration: int, state: dict[str, Any], extras: dict[str, Any],
                            rank: int, max_to_keep: int) -> Path:
    """Collective: every rank writes its shards of ``state`` and its ``extras``; rank 0 commits and applies retention.

    Args:
        state: ``{"model": ..., "optimizer": ...}`` as ``torch.distributed.checkpoint.state_dict.get_state_dict``
            returns them (DTensor shards under FSDP, full tensors otherwise; DCP writes replicated tensors once).
        extras: this rank's small state (RNG, loader position, counters), written with ``torch.save``.
        rank: this process's global rank.

    Raises:
        RuntimeError: on every rank, if a floating-point tensor of the model/optimizer state is not finite on any rank.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    try:
        _assert_finite(_local_tensors(state))
        finite = 1.0
    except RuntimeError as error:
        logger.error("%s", error)
        finite = 0.0
    flag = torch.tensor([finite])
    if dist.is_initialized():  # gloo all-reduces CPU tensors; on NCCL the flag must live on the GPU
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = flag.to(backend_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1:
        raise RuntimeError(f"refusing to checkpoint iteration {iteration}: non-finite tensors on some rank")
    final_dir = checkpoint_root(output_dir) / f"iter_{iteration:07d}"
    if (final_dir / COMMIT_MARKER).exists():  # every rank sees the same shared directory, so all return here
        return final_dir
    final_dir.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(final_dir), no_dist=not dist.is_initialized())
    write_atomic(final_dir / EXTRAS_FILE.format(rank=rank), lambda f: torch.save(extras, f))
    if dist.is_initialized():
        dist.barrier()  # every rank's shard and extras are on disk before the marker
    if rank == 0:
        write_bytes_atomic(final_dir / COMMIT_MARKER, b"ok\n")
        logger.info("saved sharded checkpoint %s", final_dir)
        apply_retention(output_dir, max_to_keep)  # only rank 0 purges
    if dist.is_initialized():
        dist.barrier()  # nobody starts the next save (or exits) before the commit
    return final_dir


def load_sharded_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Loads a DCP checkpoint in place into ``state`` (same structure as saved; its tensors give the target sharding,
    so the world size may differ from the one that saved). Works without a process group."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    logger.info("resuming from sharded checkpoint %s", path)


def load_extras(path: str | Path, rank: int, world_size: int) -> tuple[dict[str, Any], bool]:
    """This rank's extras of a sharded checkpoint.

    Returns:
        ``(extras, exact)``: ``exact`` is True when the checkpoint was written at this world size, so this rank's
        own file (RNG streams included) continues exactly. Otherwise rank 0's extras come back with ``rng`` removed:
        per-rank RNG streams do not carry over to another world size and the caller reseeds.
    """
    path = Path(path)
    own = path / EXTRAS_FILE.format(rank=rank)
    if own.is_file():
        extras = torch.load(own, map_location="cpu", weights_only=True)
        if extras.get("world_size") == world_size:
            return extras, True
    extras = torch.load(path / EXTRAS_FILE.format(rank=0), map_location="cpu", weights_only=True)
    extras.pop("rng", None)
    return extras, False


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of either layout as one plain dict on CPU, without a process group or a model to load into:
    ``model`` (full tensors by parameter name), ``optimizer``, ``iteration``, ``loader``... (sharded: rank 0's
    extras). For tools that read weights (phase initialisation, exports, demos); training resumes through DCP."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), str(Path(tmp) / STATE_FILE))  # gathers every shard, in one process
        state = torch.load(Path(tmp) / STATE_FILE, map_location="cpu", weights_only=True)
    extras = torch.load(path / EXTRAS_FILE.format(rank=0), map_location="cpu", weights_only=True)
    return {**extras, **state}
