"""Copy-detection dedup (DINOv2 A.3 self-deduplication): kNN graph over copy embeddings, cos > threshold, components.

Every embedded pool image queries its k = 64 nearest neighbours (`knn.Searcher`: exact flat search for small pools,
IVF / IVF-PQ with an exact re-rank for large ones). Pairs with cosine > `copy_dedup.threshold` (0.6) are edges of an
undirected graph. Its connected components are only reported (they chain unrelated images); images are grouped by
`groups.group_pairs`, shared with the hash stage: giant components (above a share of the pool) are split or flagged,
then greedy representatives in the documented order (largest width*height, then first listed) keep every removed
image within the threshold of the image it is removed in favour of.

Resume and scale-out: an IVF index is trained once and written atomically to `index-<fingerprint>.faiss` in the
stage folder (`shared_index_file`); query rows are then searched in slices of `copy_dedup.slice_rows` against it
(`SharedIndex`), each slice's candidate pairs written atomically to `_work/pairs-*.parquet`. The slices run in this
process or as one SLURM job array (`executors.run_slices`, `executor.kind: slurm`); either way a killed run redoes
only the slices without a file, and the pairs are read back in slice order, so both give the same bytes.

The index file outlives `_work`: decontamination searches the same vectors (the whole embedded pool, rows removed
here included) with the same `copy_dedup` index settings and seed, so it loads this file instead of training the same
index again. Its name carries a fingerprint of what decides the index (embed_copy's commit, the pool's shape, every
`KnnParams` field): decontamination only loads a file whose name it computes itself, and retrains otherwise. It is a
cache, not a checksummed output: a flat index writes none, and the file goes with the stage folder when the stage
re-runs for another fingerprint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.executors import SliceRunner, SliceTask, run_here, slice_runner
from data_pipeline.core.knn import (
    KnnParams,
    Searcher,
    index_to_bytes,
    knn_params,
    measure_recalls,
    resolve_kind,
    searcher_from_bytes,
)
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.dedup.groups import giant_limit, group_pairs, quality_rank
from data_pipeline.embed.embed import load_embeddings

# Giant components are split in steps of 0.01 of cosine; edges at cos >= 0.99 (level 1) are never dropped.
LEVELS_PER_UNIT = 100


def upstream_tag(ctx: StageContext, *names: str) -> dict[bytes, bytes]:
    """Schema metadata naming the upstream commits (fingerprint + output checksums) and the global seed.

    Attached to a plan table, it enters the stage fingerprint, so new embeddings (or a new seed, which drives IVF
    training and the audit sample) re-run the stage even when the manifest is unchanged. `write_parquet_atomic`
    drops schema metadata, so outputs are unaffected.
    """
    tag = {}
    for name in names:
        marker = artifacts.read_success(ctx.require(name)) or {}
        tag[name] = {"fingerprint": marker.get("fingerprint"), "outputs": marker.get("outputs")}
    return {b"upstream": json.dumps(tag, sort_keys=True).encode(), b"seed": str(ctx.cfg.seed).encode()}


def plan_copy_dedup(ctx: StageContext) -> pa.Table:
    """The near_dedup manifest, tagged with the embed_copy commit."""
    t = artifacts.read_table(ctx.require("near_dedup") / "manifest.parquet")
    return t.replace_schema_metadata(upstream_tag(ctx, "embed_copy"))


def pool_row_ids(table: pa.Table, rows: pa.Table, check_keep: bool = True) -> np.ndarray:
    """row_id of each pool vector, checked against the manifest (ids must match; rows must be kept if check_keep).

    Returns:
        int64 [n_pool].
    """
    row_id = rows.column("row_id").to_numpy().astype(np.int64)
    if row_id.size and (row_id.min() < 0 or row_id.max() >= table.num_rows):
        raise ValueError("embed_copy pool_rows.parquet has row_ids outside the upstream manifest; re-run embed_copy")
    ids = np.array(table.column("id").to_pylist(), dtype=object)
    keep = np.array(table.column("keep").to_pylist(), dtype=bool)
    if not (ids[row_id] == np.array(rows.column("id").to_pylist(), dtype=object)).all() or (
        check_keep and not keep[row_id].all()
    ):
        raise ValueError("embed_copy pool does not match the upstream manifest (ids / keep); re-run embed_copy")
    return row_id


def shared_index_file(ctx: StageContext, pool: np.ndarray, params: KnnParams) -> Path:
    """Where copy_dedup keeps the trained index of `pool` for decontamination: `D/copy_dedup/index-<fp>.faiss`.

    The fingerprint covers everything the index is a function of: the pool (embed_copy's commit and the array's
    shape) and every `KnnParams` field (kind, budget, lists, codes, seed, threads, device, ...), so a file with this
    name holds the index `Searcher(pool, params)` would train.
    """
    marker = artifacts.read_success(ctx.require("embed_copy")) or {}
    fp = artifacts.digest({"pool": {"fingerprint": marker.get("fingerprint"), "outputs": marker.get("outputs"),
                                    "shape": list(pool.shape)},
                           "params": asdict(params)})
    return ctx.stage_dir("copy_dedup") / f"index-{fp}.faiss"


class SharedIndex:
    """The pool and its kNN index as every slice of a search sees them.

    The driver builds it (`build`): an IVF index is trained once and written atomically to `index_file`, or loaded
    from there on resume (or from copy_dedup's file, in decontamination). A SLURM array task gets it pickled without
    the loaded index (the pool as its .npy file name, see `artifacts.array_ref`) and loads the same index file on
    first use; a flat index is rebuilt from the pool instead (flat is only chosen up to `flat_max` vectors, where
    adding is cheaper than writing the copy).
    """

    def __init__(self, pool: np.ndarray, params: KnnParams, index_file: Path) -> None:
        self.pool_ref = artifacts.array_ref(pool)
        self.params = params
        self.index_file = str(index_file)
        self._searcher: Searcher | None = None

    @classmethod
    def build(cls, pool: np.ndarray, params: KnnParams, index_file: Path) -> SharedIndex:
        """Driver side: load `index_file`, or build the index and write it there when it is not flat."""
        shared = cls(pool, params, index_file)
        if index_file.is_file():
            shared._searcher = searcher_from_bytes(pool, params, index_file.read_bytes())
        else:
            shared._searcher = Searcher(pool, params)
            if shared._searcher.kind != "flat":  # IVF training + adding is the expensive part worth sharing
                artifacts.write_bytes_atomic(index_file, index_to_bytes(shared._searcher))
        return shared

    def searcher(self) -> Searcher:
        """The searcher, loaded once per process."""
        if self._searcher is None:
            pool = artifacts.open_array_ref(self.pool_ref)
            index_file = Path(self.index_file)
            if index_file.is_file():
                self._searcher = searcher_from_bytes(pool, self.params, index_file.read_bytes())
            elif resolve_kind(pool.shape[0], pool.shape[1], self.params) == "flat":
                self._searcher = Searcher(pool, self.params)
            else:  # retraining here could silently give another index than the other slices
                raise FileNotFoundError(f"shared kNN index {index_file} is missing; re-run the stage")
        return self._searcher

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_searcher"] = None  # faiss indexes do not pickle; the task loads the index file instead
        return state


def _chunk_pairs(searcher: Searcher, start: int, stop: int, k: int, floor: float) -> pa.Table:
    """Pairs (a < b pool indices) among the kNN of rows [start, stop) with sim > floor."""
    sims, idx = searcher.search_self(start, stop, k)
    q = np.repeat(np.arange(start, stop, dtype=np.int64), k)
    nb, s = idx.ravel(), sims.ravel()
    ok = (nb >= 0) & (s > floor)
    a, b = np.minimum(q[ok], nb[ok]), np.maximum(q[ok], nb[ok])
    return pa.table({"a": a, "b": b, "sim": s[ok].astype(np.float32)})


def pair_slice(shared: SharedIndex, start: int, stop: int, k: int, floor: float, out_path: str) -> None:
    """One slice task: the pairs of query rows [start, stop), written atomically to `out_path`."""
    artifacts.write_parquet_atomic(Path(out_path), _chunk_pairs(shared.searcher(), start, stop, k, floor))


def self_pairs(
    pool: np.ndarray, k: int, floor: float, params, work: Path, run: SliceRunner = run_here,
    slice_rows: int = 1 << 16, index_file: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Searcher | None]:
    """Unique undirected kNN pairs with sim > floor, resumable through `work`.

    Args:
        pool: float16 [n, d] L2-normalised (a memmap of a .npy file for SLURM slices, else it is pickled).
        k: neighbours per row (self excluded).
        floor: lowest similarity kept (min of the edge threshold and the audit band).
        params: KnnParams.
        run: how the query slices run (`executors.run_here`, or `slice_runner` of the stage's config).
        slice_rows: query rows per slice (per array task).
        index_file: where the IVF index is written (and loaded from on resume); `work/index.faiss` when None.

    Returns:
        (a int64 [P], b int64 [P], sim float32 [P], searcher) with a < b, sorted by (a, b); searcher is None when
        the pool has fewer than two rows.
    """
    n = pool.shape[0]
    if n < 2:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), None
    shared = SharedIndex.build(pool, params, index_file if index_file is not None else work / "index.faiss")
    tasks = []
    for i, start in enumerate(range(0, n, slice_rows)):
        stop = min(n, start + slice_rows)
        out = work / f"pairs-{start:012d}-{stop:012d}.parquet"
        tasks.append(SliceTask(i, pair_slice, (shared, start, stop, min(k, n - 1), floor), str(out)))
    run(tasks, "copy_dedup kNN")
    t = pa.concat_tables([artifacts.read_table(Path(task.out_path)) for task in tasks])
    a, b, s = (t.column(c).to_numpy() for c in ("a", "b", "sim"))
    # Each pair may come from both endpoints; keep one (max sim, though exact scoring makes them equal).
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(a.size, dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first], shared.searcher()


def edge_levels(sim: np.ndarray) -> np.ndarray:
    """Looseness of copy edges for splitting giants: 1 - cosine in hundredths, rounded up (cos >= 0.99 -> level 1)."""
    return np.maximum(1, np.ceil((1.0 - sim.astype(np.float64)) * LEVELS_PER_UNIT - 1e-9)).astype(np.int64)


def audit_sample(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, low: float, high: float, n_pairs: int, seed: int
) -> np.ndarray:
    """Seeded sample (sorted positions) of up to `n_pairs` pairs with low < sim <= high."""
    band = np.flatnonzero((s > low) & (s <= high))
    if band.size > n_pairs:
        band = np.sort(np.random.default_rng(seed).choice(band, n_pairs, replace=False))
    return band


def _set_column(table: pa.Table, name: str, values, typ: pa.DataType) -> pa.Table:
    arr = pa.array(values, type=typ)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def finish_copy_dedup(ctx: StageContext, table: pa.Table) -> dict:
    """Build the copy graph; write manifest.parquet, edges.parquet, audit.parquet and components.json.

    Removed rows get dup_kind='copy', dup_group = the row_id and dup_of = the id of the representative they are
    removed in favour of (cosine > threshold with it); rows that earlier stages grouped under a removed member
    follow it to the new kept member (dup_group only). New column copy_component (int64): row_id of the copy
    group's kept member for embedded rows, -1 for the rest. components.json: the threshold graph's components,
    giant components and what was done with them, the final group sizes.
    """
    cfg = ctx.cfg.copy_dedup
    out_dir = ctx.stage_dir("copy_dedup")
    work = out_dir / "_work"
    pool, rows = load_embeddings(ctx.stage_dir("embed_copy"), "pool")
    pool_rows = pool_row_ids(table, rows)
    n, n_rows = pool.shape[0], table.num_rows
    params = knn_params(cfg, seed=ctx.cfg.seed)
    floor = cfg.threshold - cfg.audit_margin  # the audit band reaches below the edge threshold
    run = slice_runner(ctx.cfg, ctx.output_dir / "_executor" / "copy_dedup")
    a, b, s, searcher = self_pairs(pool, cfg.k, floor, params, work, run, cfg.slice_rows,
                                   shared_index_file(ctx, pool, params))
    edge = s > cfg.threshold

    ids = np.array(table.column("id").to_pylist(), dtype=object)
    w = table.column("width").fill_null(0).to_numpy().astype(np.int64)
    h = table.column("height").fill_null(0).to_numpy().astype(np.int64)
    limit = giant_limit(n, cfg.giant_fraction, cfg.giant_min_size)
    grouping = group_pairs(n, a[edge], b[edge], s[edge], edge_levels(s[edge]),
                           quality_rank((w * h)[pool_rows], pool_rows), limit, cfg.giant_action,
                           floor_level=1)
    rep = pool_rows[grouping.rep]

    keep = np.array(table.column("keep").to_pylist(), dtype=bool)
    kept_in = int(keep.sum())
    kind = table.column("dup_kind").to_pylist()
    dup_of = table.column("dup_of").to_pylist()
    group = np.array(table.column("dup_group").to_pylist(), dtype=np.int64)
    moved = rep != pool_rows
    removed = pool_rows[moved]
    keep[removed] = False
    for row, r in zip(removed, rep[moved]):
        kind[row], dup_of[row] = "copy", str(ids[r])
    # Rows removed earlier keep their dup_of (the image they were removed in favour of) and follow their group's
    # kept member (dup_group) to its copy-detection representative.
    follow = np.arange(n_rows, dtype=np.int64)
    follow[pool_rows] = rep
    new_group = follow[group]
    component = np.full(n_rows, -1, dtype=np.int64)
    component[pool_rows] = rep
    for name, values, typ in (("dup_group", new_group, pa.int64()), ("dup_of", dup_of, pa.string()),
                              ("dup_kind", kind, pa.string()), ("keep", keep, pa.bool_()),
                              ("copy_component", component, pa.int64())):
        table = _set_column(table, name, values, typ)
    artifacts.write_parquet_atomic(out_dir / "manifest.parquet", table)

    ei, ej = pool_rows[a[edge]], pool_rows[b[edge]]
    order = np.lexsort((ej, ei))
    artifacts.write_parquet_atomic(out_dir / "edges.parquet", pa.table({
        "i": pa.array(ei[order], pa.int64()), "j": pa.array(ej[order], pa.int64()),
        "sim": pa.array(s[edge][order], pa.float32())}))
    artifacts.write_parquet_atomic(out_dir / "audit.parquet", audit_table(table, pool_rows, a, b, s, cfg, ctx.cfg.seed))
    summary = grouping.summary
    for g in summary["giant"]["largest"]:
        g["row"] = int(pool_rows[g["row"]])  # pool index -> manifest row_id
    artifacts.write_json_atomic(out_dir / "components.json", summary)

    kind_used = searcher.kind if searcher is not None else "flat"
    k_used = min(cfg.k, max(n - 1, 0))
    if kind_used == "flat":
        recall = recall_at_k = 1.0
        method = "exact"
    else:
        # Edge recall (exact neighbours above the threshold that the index found) is what decides the graph;
        # plain recall@k is dominated by unrelated far neighbours and is reported for reference.
        rc = (pool, k_used, params, cfg.recall_sample, ctx.cfg.seed)
        recall, recall_at_k = measure_recalls(*rc, searcher=searcher, min_sims=(cfg.threshold, None))
        method = f"sampled:{min(cfg.recall_sample, n)}"
    nlist = searcher.nlist if searcher is not None else 0
    mib = (searcher.nbytes if searcher is not None else 0) / (1 << 20)
    print(f"[copy_dedup] index={kind_used} nlist={nlist} ({mib:.0f} MiB): edge recall (cos > {cfg.threshold}) "
          f"{recall:.4f}, recall@{k_used} {recall_at_k:.4f} ({method}); {int(edge.sum())} edges, "
          f"{len(removed)} of {n} removed, "
          f"largest component {summary['largest'][0] if summary['largest'] else 0}, "
          f"{summary['giant']['count']} above {limit} ({cfg.giant_action})")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "inputs": int(n),
        "outputs": int(keep.sum()),
        "removed": {"copy": int(len(removed))},
        "not_embedded": int(kept_in - n),
        "edges": int(edge.sum()),
        "components": summary["components"],
        "largest_component": int(summary["largest"][0]) if summary["largest"] else 0,
        "giant_components": summary["giant"]["count"],
        "index": kind_used,
        "index_bytes": int(searcher.nbytes) if searcher is not None else 0,
        "memory_budget_gb": cfg.memory_budget_gb,
        "nlist": int(nlist),
        "recall": round(float(recall), 6),
        "recall_at_k": round(float(recall_at_k), 6),
        "recall_method": method,
        "audit_band": [round(cfg.threshold + d * cfg.audit_margin, 6) for d in (-1, 0, 1)],
        "rejects": {},  # rows rejected upstream are counted by the stage that rejected them
    }


def audit_table(table: pa.Table, pool_rows: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray, cfg,
                seed: int) -> pa.Table:
    """Borderline pairs for human audit: columns i, j, sim, edge, id_*, path_*, member_* (row_ids, sorted)."""
    pick = audit_sample(a, b, s, cfg.threshold - cfg.audit_margin, cfg.threshold + cfg.audit_margin, cfg.audit_pairs,
                        seed)
    i, j = pool_rows[a[pick]], pool_rows[b[pick]]
    order = np.lexsort((j, i))
    i, j, sim = i[order], j[order], s[pick][order]
    cols = {"i": pa.array(i, pa.int64()), "j": pa.array(j, pa.int64()), "sim": pa.array(sim, pa.float32()),
            "edge": pa.array(sim > cfg.threshold, pa.bool_())}
    for name in ("id", "path", "member"):
        col = table.column(name)
        cols[f"{name}_i"] = col.take(pa.array(i, pa.int64())).cast(pa.string())
        cols[f"{name}_j"] = col.take(pa.array(j, pa.int64())).cast(pa.string())
    return pa.table(cols)


STAGE = Stage(
    name="copy_dedup",
    inputs=("near_dedup", "embed_copy"),
    outputs=("manifest.parquet", "edges.parquet", "audit.parquet", "components.json"),
    config_sections=("copy_dedup",),
    plan=plan_copy_dedup,
    finish=finish_copy_dedup,
    rules=1,  # 1: ties to the first listed (was: smallest id)
)
