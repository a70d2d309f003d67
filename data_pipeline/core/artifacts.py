"""Artifact paths, the curation file formats (written atomically) and the per-stage `_SUCCESS.json` commit marker."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# write_bytes_atomic is used here and by the stages (as artifacts.write_bytes_atomic) for raw artifacts.
from dinov2.io.atomic import atomic_path, write_atomic, write_bytes_atomic

SUCCESS = "_SUCCESS.json"
FINGERPRINT = "_FINGERPRINT"
PARTS = "parts"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write JSON with sorted keys (byte-stable)."""
    write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode())


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Atomically write a Parquet table; no timestamps or writer-dependent metadata, so bytes are deterministic."""
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Atomically write a `.npy` array."""
    write_atomic(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))


def npy_file(x: np.ndarray) -> str | None:
    """The .npy file `x` memory-maps in full (as `np.load(path, mmap_mode="r")` returns it), else None.

    Lets a global stage hand SLURM array tasks a file name instead of pickling the array; a slice or a view of a
    memmap maps only part of its file and gets None.
    """
    name = getattr(x, "filename", None)
    if not isinstance(x, np.memmap) or not name or x.dtype.hasobject or not Path(name).is_file():
        return None
    try:
        whole = np.load(name, mmap_mode="r")
    except (OSError, ValueError):
        return None
    same = (whole.shape, whole.dtype, whole.offset, whole.strides) == (x.shape, x.dtype, x.offset, x.strides)
    return str(name) if same else None


def array_ref(x: np.ndarray) -> str | np.ndarray:
    """What a SLURM array task is given to read `x`: its .npy file when `x` maps one in full, else `x` itself."""
    return npy_file(x) or x


def open_array_ref(ref: str | np.ndarray) -> np.ndarray:
    """The array an `array_ref` names (a read-only memmap for a file)."""
    return np.load(ref, mmap_mode="r") if isinstance(ref, str) else ref


def read_table(path: Path) -> pa.Table:
    """Read a Parquet table written by this package."""
    return pq.read_table(path)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_path(stage_dir: Path, shard: int) -> Path:
    """Path of one shard's output table inside a stage directory."""
    return stage_dir / PARTS / f"part-{shard:06d}.parquet"


def read_success(stage_dir: Path) -> dict | None:
    """The stage's commit marker, or None if the stage never finished."""
    p = stage_dir / SUCCESS
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def prepare_stage_dir(stage_dir: Path, fingerprint: str) -> None:
    """Create `stage_dir`; wipe it first if it holds partial work for a different input/config fingerprint."""
    fp_file = stage_dir / FINGERPRINT
    if stage_dir.exists() and (not fp_file.is_file() or fp_file.read_text() != fingerprint):
        shutil.rmtree(stage_dir)
    if not fp_file.is_file():
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(fp_file, fingerprint.encode())


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the outputs (decoders, hashing, search), for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("numpy", "pillow", "imagehash", "scipy", "faiss-cpu", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def commit_stage(stage_dir: Path, fingerprint: str, outputs: list[str], counts: dict) -> dict:
    """Write `_SUCCESS.json` last: fingerprint, output checksums, counts and library versions (no wall time, so it
    stays byte-stable).

    Returns:
        The marker's content; downstream stages fingerprint their input with it.
    """
    marker = {
        "fingerprint": fingerprint,
        "outputs": {name: file_sha256(stage_dir / name) for name in sorted(outputs)},
        "counts": counts,
        "versions": library_versions(),
    }
    write_json_atomic(stage_dir / SUCCESS, marker)
    parts = stage_dir / PARTS
    if parts.exists():
        # Parts are folded into the outputs; dropping them keeps the stage dir to its declared artifacts.
        shutil.rmtree(parts)
    return marker
