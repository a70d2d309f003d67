"""Dedup precision and recall on the demo crawl's ground truth, per level, for the grouping rule the pipeline ran and
for the former one (connected components of the threshold graph), recomputed from the same stage artifacts.

Truth: images showing the same picture (an original and its near-copies) are duplicates of each other; every other
image (each card, flag, recoloured drawing, captioned picture, distractor, planted evaluation copy) is its own group.
A removal is right when the removed image and the kept image of its group (`dup_group`) show the same picture;
recall is the share of the truth's duplicates (group size - 1, summed) removed rightly.

The former rule is rebuilt without re-running anything: near_dedup's edges.parquet holds every pair within the hash
threshold among the same candidates; the copy level's former pool (one image per former near component) is a subset
of the embedded pool, so its kNN graph is recomputed exactly from embed_copy's vectors with the configured k and
threshold. Its representative is the component's best image in the same order.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.dedup.groups import connected_labels, pick_representatives
from data_pipeline.dedup.phash import FLAG_DEGENERATE, FLAG_HASHED

LEVELS = (("exact", "exact_dedup"), ("exact + pHash", "near_dedup"), ("exact + pHash + copy", "copy_dedup"))


def truth_groups(records) -> dict[str, str]:
    """Crawl file name -> the picture it shows (its own name for images with no view)."""
    return {r.file: (r.view or f"single:{r.file}") for r in records}


def quality(group: dict[str, str], names: list[str], kept_of: np.ndarray, ok: np.ndarray) -> tuple[float, float, int]:
    """(precision, recall, removals) of a grouping: row k is removed in favour of row kept_of[k] when they differ."""
    removed = np.flatnonzero(ok & (kept_of != np.arange(len(names))))
    right = sum(group[names[k]] == group[names[kept_of[k]]] for k in removed)
    sizes = Counter(group[n] for n, good in zip(names, ok) if good)
    duplicates = sum(n - 1 for n in sizes.values())
    return (right / removed.size if removed.size else 1.0), right / max(duplicates, 1), int(removed.size)


def _pixels(manifest) -> np.ndarray:
    return (np.nan_to_num(manifest.column("width").to_numpy(zero_copy_only=False).astype(float)) *
            np.nan_to_num(manifest.column("height").to_numpy(zero_copy_only=False).astype(float))).astype(np.int64)


def _components(n: int, nodes: np.ndarray, i: np.ndarray, j: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Former rule on the row space: the best row of each connected component of `nodes` (others map to self); ties
    in size go to the first listed row, as in the pipeline."""
    rep = np.arange(n, dtype=np.int64)
    local = np.full(n, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    labels = connected_labels(nodes.size, local[i], local[j])
    rep[nodes] = nodes[pick_representatives(labels, pixels[nodes], nodes)]
    return rep


def _knn_edges(vectors: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) where b is among a's k nearest neighbours (or the reverse) with cosine > threshold."""
    x = vectors.astype(np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, x.shape[0] - 1)
    if k < 1:
        e = np.zeros(0, np.int64)
        return e, e
    nbr = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    q = np.repeat(np.arange(x.shape[0]), k)
    ok = sims[q, nbr.ravel()] > threshold
    pairs = np.unique(np.sort(np.stack([q[ok], nbr.ravel()[ok]], 1), axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def former_rule(curated: Path, copy_k: int, copy_threshold: float,
                skip_degenerate: bool = True) -> dict[str, np.ndarray]:
    """Kept row per row at each level under the former connected-components rule (exact level unchanged)."""
    exact = pq.read_table(curated / "exact_dedup" / "manifest.parquet")
    near = pq.read_table(curated / "near_dedup" / "manifest.parquet")
    n = exact.num_rows
    pixels = _pixels(exact)
    kept_exact = np.array(exact.column("dup_group").to_pylist(), dtype=np.int64)
    flags = near.column("phash_flags").to_numpy()
    cand = np.array(exact.column("keep").to_pylist(), dtype=bool) & (flags & FLAG_HASHED > 0)
    if skip_degenerate:
        cand &= (flags & FLAG_DEGENERATE) == 0
    edges = pq.read_table(curated / "near_dedup" / "edges.parquet")
    near_rep = _components(n, np.flatnonzero(cand), edges.column("i").to_numpy(), edges.column("j").to_numpy(),
                           pixels)
    kept_near = near_rep[kept_exact]
    pool_rows = pq.read_table(curated / "embed_copy" / "pool_rows.parquet").column("row_id").to_numpy()
    vectors = np.load(curated / "embed_copy" / "pool.npy", mmap_mode="r")
    in_pool = np.flatnonzero(kept_near[pool_rows] == pool_rows)  # the former near stage's survivors
    a, b = _knn_edges(np.asarray(vectors[in_pool]), copy_k, copy_threshold)
    rows = pool_rows[in_pool]
    copy_rep = _components(n, rows, rows[a], rows[b], pixels)
    return {"exact_dedup": kept_exact, "near_dedup": kept_near, "copy_dedup": copy_rep[kept_near]}


def pipeline_rule(curated: Path) -> dict[str, np.ndarray]:
    """Kept row per row at each level as the pipeline grouped them (dup_group of removed rows)."""
    out = {}
    for _, stage in LEVELS:
        m = pq.read_table(curated / stage / "manifest.parquet")
        group = np.array(m.column("dup_group").fill_null(-1).to_pylist(), dtype=np.int64)
        keep = np.array(m.column("keep").to_pylist(), dtype=bool)
        kept_of = np.arange(m.num_rows, dtype=np.int64)
        removed = ~keep & (group >= 0)
        kept_of[removed] = group[removed]
        out[stage] = kept_of
    return out


def compare(records, curated: Path, copy_k: int, copy_threshold: float) -> list[tuple[str, tuple, tuple]]:
    """Per level: (label, (precision, recall, removed) former rule, same for the pipeline's rule)."""
    m = pq.read_table(curated / "exact_dedup" / "manifest.parquet")
    names = [Path(p).name for p in m.column("path").to_pylist()]
    ok = np.array([s == "ok" for s in m.column("status").to_pylist()], dtype=bool)
    group = truth_groups(records)
    before, after = former_rule(curated, copy_k, copy_threshold), pipeline_rule(curated)
    return [(label, quality(group, names, before[stage], ok), quality(group, names, after[stage], ok))
            for label, stage in LEVELS]
