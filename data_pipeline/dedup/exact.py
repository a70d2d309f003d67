"""Exact-dedup stage: items with equal sha256 of bytes or of decoded pixels form one group; one member is kept."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.dedup.groups import connected_labels, pick_representatives

DEDUP_FIELDS = [
    ("dup_group", pa.int64()),
    ("dup_of", pa.string()),
    ("dup_kind", pa.string()),
    ("keep", pa.bool_()),
]


def _key_edges(keys: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Edges chaining every node that shares a key to the first node with that key."""
    first: dict[str, int] = {}
    i, j = [], []
    for k, key in enumerate(keys):
        if not key:
            continue
        if key in first:
            i.append(first[key])
            j.append(k)
        else:
            first[key] = k
    return np.array(i, dtype=np.int64), np.array(j, dtype=np.int64)


def exact_groups(table: pa.Table) -> dict[str, list]:
    """Group ok rows by byte sha256 and pixel sha256 (union of both relations).

    Returns:
        Columns dup_group (row_id of the kept member; own row_id for others), dup_of (kept id or ''),
        dup_kind ('exact_bytes' | 'exact_pixels' | ''), keep (ok and kept).
    """
    n = table.num_rows
    ok = np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool)
    sha = [s if good else None for s, good in zip(table.column("sha256").to_pylist(), ok)]
    pix = [s if good else None for s, good in zip(table.column("pixel_sha256").to_pylist(), ok)]
    bi, bj = _key_edges(sha)
    pi, pj = _key_edges(pix)
    labels = connected_labels(n, np.concatenate([bi, pi]), np.concatenate([bj, pj]))
    w = np.array(table.column("width").fill_null(0).to_pylist(), dtype=np.int64)
    h = np.array(table.column("height").fill_null(0).to_pylist(), dtype=np.int64)
    ids = np.array(table.column("id").to_pylist())
    rep = pick_representatives(labels, w * h, np.arange(n, dtype=np.int64))  # rows are in row_id order
    kind, dup_of = [""] * n, [""] * n
    for k in np.flatnonzero(rep != np.arange(n)):
        dup_of[k] = str(ids[rep[k]])
        kind[k] = "exact_bytes" if sha[k] == sha[rep[k]] else "exact_pixels"
    keep = ok & (rep == np.arange(n))
    return {"dup_group": rep.tolist(), "dup_of": dup_of, "dup_kind": kind, "keep": keep.tolist()}


def plan_exact(ctx: StageContext) -> pa.Table:
    """The decode manifest, in row_id order."""
    return artifacts.read_table(ctx.stage_dir("decode") / "manifest.parquet")


def finish_exact(ctx: StageContext, table: pa.Table) -> dict:
    """Write `manifest.parquet`: decode columns + dup_group, dup_of, dup_kind, keep."""
    cols = exact_groups(table)
    for name, typ in DEDUP_FIELDS:
        table = table.append_column(pa.field(name, typ), pa.array(cols[name], type=typ))
    artifacts.write_parquet_atomic(ctx.stage_dir("exact_dedup") / "manifest.parquet", table)
    kinds = [k for k in cols["dup_kind"] if k]
    return {
        "inputs": int(sum(s == "ok" for s in table.column("status").to_pylist())),
        "outputs": int(sum(cols["keep"])),
        "removed": {k: kinds.count(k) for k in sorted(set(kinds))},
        "rejects": {},  # rows rejected upstream are counted by the stage that rejected them
    }


STAGE = Stage(
    name="exact_dedup",
    inputs=("decode",),
    outputs=("manifest.parquet",),
    config_sections=(),
    plan=plan_exact,
    finish=finish_exact,
    rules=1,  # 1: ties to the first listed (was: smallest id)
)
