"""Near-duplicate stage: Hamming range search over 64-bit hashes with a Faiss binary index, chain-free groups."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.config import HashConfig
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.dedup.groups import giant_limit, group_pairs, quality_rank
from data_pipeline.dedup.phash import FLAG_DEGENERATE, FLAG_HASHED


def to_codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 [n] -> uint8 [n, 8], the layout Faiss binary indexes take (bit order is irrelevant to Hamming)."""
    return np.ascontiguousarray(hashes.astype(np.uint64)).view(np.uint8).reshape(-1, 8)


def multihash_layout(threshold: int) -> tuple[int, int, int]:
    """(nhash, bits per table, nflip) of an exact multi-index hash for Hamming distance <= threshold.

    Pigeonhole: split the 64 bits into m disjoint chunks; a pair within distance t has some chunk with at most
    f flips whenever m * (f + 1) > t. Exact-match buckets (f = 0) are far cheaper to probe than flipped ones, so
    use t + 1 chunks while they keep >= 12 bits (t <= 4), else 4 chunks of 16 bits with enough flips.
    """
    if threshold <= 3:
        return 4, 16, 0
    if threshold <= 4:
        return threshold + 1, 64 // (threshold + 1), 0
    return 4, 16, next(f for f in range(16) if 4 * (f + 1) > threshold)


def build_index(codes: np.ndarray, threshold: int, kind: str, flat_max: int) -> faiss.IndexBinary:
    """Exact binary index for distance <= threshold.

    `flat` is brute-force popcount; `multihash` is Faiss multi-index hashing laid out by `multihash_layout`
    (exact by pigeonhole); `auto` picks flat up to `flat_max` codes.
    """
    if kind == "auto":
        kind = "flat" if codes.shape[0] <= flat_max else "multihash"
    if kind == "flat":
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash, bits, nflip = multihash_layout(threshold)
        index = faiss.IndexBinaryMultiHash(64, nhash, bits)
        index.nflip = nflip
    index.add(codes)
    return index


def near_pairs(hashes: np.ndarray, cfg: HashConfig, batch: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming(hashes[i], hashes[j]) <= cfg.threshold.

    Args:
        hashes: uint64 [n].

    Returns:
        (i int64 [E], j int64 [E], dist int32 [E]), sorted by (i, j).
    """
    faiss.omp_set_num_threads(cfg.threads)
    codes = to_codes(hashes)
    if codes.shape[0] == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e.astype(np.int32)
    index = build_index(codes, cfg.threshold, cfg.index, cfg.flat_max)
    out_i, out_j, out_d = [], [], []
    for start in range(0, codes.shape[0], batch):
        # Faiss binary range search is strict (distance < radius), hence threshold + 1.
        lims, dist, nbr = index.range_search(codes[start : start + batch], cfg.threshold + 1)
        q = np.repeat(np.arange(start, start + len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = q < nbr
        out_i.append(q[keep])
        out_j.append(nbr[keep].astype(np.int64))
        out_d.append(dist[keep].astype(np.int32))
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def plan_near(ctx: StageContext) -> pa.Table:
    """The exact-dedup manifest plus the `phash` and `phash_flags` columns."""
    t = artifacts.read_table(ctx.require("exact_dedup") / "manifest.parquet")
    d = ctx.require("phash")
    t = t.append_column("phash", pa.array(np.load(d / "phash.npy"), pa.uint64()))
    return t.append_column("phash_flags", pa.array(np.load(d / "phash_flags.npy"), pa.uint8()))


def finish_near(ctx: StageContext, table: pa.Table) -> dict:
    """Group near-duplicates among exact-dedup survivors; write manifest.parquet, edges.parquet, components.json.

    Grouping (`groups.group_pairs`): giant components handled per `hash.giant_*`, then greedy representatives in the
    documented order (largest width*height, then smallest id); each removed row is within `hash.threshold` of the
    row it is removed in favour of. Removed rows get dup_kind='near', dup_of=that row's id, dup_group=its row_id;
    exact duplicates keep their dup_of and follow their kept member into its group (dup_group).
    """
    cfg = ctx.cfg.hash
    flags = table.column("phash_flags").to_numpy()
    cand_mask = np.array(table.column("keep").to_pylist(), dtype=bool) & (flags & FLAG_HASHED > 0)
    if cfg.skip_degenerate:
        cand_mask &= (flags & FLAG_DEGENERATE) == 0
    cand = np.flatnonzero(cand_mask)
    ci, cj, dist = near_pairs(table.column("phash").to_numpy()[cand], cfg)
    w = table.column("width").fill_null(0).to_numpy()[cand].astype(np.int64)
    h = table.column("height").fill_null(0).to_numpy()[cand].astype(np.int64)
    ids = np.array(table.column("id").to_pylist())
    limit = giant_limit(len(cand), cfg.giant_fraction, cfg.giant_min_size)
    grouping = group_pairs(len(cand), ci, cj, -dist.astype(np.int64), dist.astype(np.int64),
                           quality_rank(w * h, ids[cand]), limit, cfg.giant_action)
    rep = cand[grouping.rep]
    group = np.array(table.column("dup_group").to_pylist(), dtype=np.int64)
    dup_of, kind = table.column("dup_of").to_pylist(), table.column("dup_kind").to_pylist()
    keep = np.array(table.column("keep").to_pylist(), dtype=bool)
    near_rep = np.arange(table.num_rows, dtype=np.int64)
    near_rep[cand] = rep
    for row, r in zip(cand, rep):
        if row != r:
            kind[row], keep[row], dup_of[row] = "near", False, str(ids[r])
    group = near_rep[group]  # exact duplicates follow their kept member into its near-duplicate group
    for name, values, typ in (("dup_group", group, pa.int64()), ("dup_of", dup_of, pa.string()),
                              ("dup_kind", kind, pa.string()), ("keep", keep, pa.bool_())):
        table = table.set_column(table.column_names.index(name), name, pa.array(values, type=typ))
    d = ctx.stage_dir("near_dedup")
    artifacts.write_parquet_atomic(d / "manifest.parquet", table)
    edges = pa.table({"i": pa.array(cand[ci], pa.int64()), "j": pa.array(cand[cj], pa.int64()),
                      "dist": pa.array(dist, pa.int32())})
    artifacts.write_parquet_atomic(d / "edges.parquet", edges)
    summary = grouping.summary
    for g in summary["giant"]["largest"]:
        g["row"] = int(cand[g["row"]])  # candidate index -> manifest row_id
    artifacts.write_json_atomic(d / "components.json", summary)
    if summary["giant"]["count"]:
        print(f"[near_dedup] {summary['giant']['count']} giant component(s) above {limit} images "
              f"({cfg.giant_action}): sizes {[g['size'] for g in summary['giant']['largest']]}")
    return {
        "inputs": int(cand_mask.sum()),
        "outputs": int(keep.sum()),
        "removed": {"near": int(sum(k == "near" for k in kind))},
        "edges": int(len(ci)),
        "largest_component": int(summary["largest"][0]) if summary["largest"] else 0,
        "giant_components": int(summary["giant"]["count"]),
        "rejects": {},  # rows rejected upstream are counted by the stage that rejected them
    }


STAGE = Stage(
    name="near_dedup",
    inputs=("exact_dedup", "phash"),
    outputs=("manifest.parquet", "edges.parquet", "components.json"),
    config_sections=("hash",),
    plan=plan_near,
    finish=finish_near,
)
