"""Stage `retrieve`: select pool images for curated seed sets (DINOv2 appendix A.4), plus an optional balanced sample.

Per seed set (embed_ssl/seed-<name>.npy + .parquet), one mode:
- `as_is`: the seed images themselves (row_id -1 unless an image with the same sha256 is in the pool);
- `sample`: the `n_neighbors` nearest pool images of every seed image by cosine (exact block-wise search, `knn.py`),
  optionally only those with similarity >= `min_similarity`;
- `cluster`: each seed image goes to its nearest level-1 centroid; every cluster holding MORE than
  `min_seeds_in_cluster` seeds contributes `per_cluster` random members (all when smaller), and the set is then capped
  at `max_images` by a seeded subsample.
With `cluster.mode=hierarchical` and `cluster.balanced_size > 0`, a balanced hierarchical sample (mode `balanced`) is
added. The union is deduplicated by (row_id, id) keeping every reason and ordered by (row_id, sha256, id):
`selected.parquet` (one row per image) and `retrieval.parquet` (one row per (image, reason)).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.cluster.cluster import load_hierarchy, load_level
from data_pipeline.cluster.kmeans import assign, balanced_sample, set_threads
from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, SeedSetConfig
from data_pipeline.core.knn import KnnParams, exact_search
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.embed.embed import load_embeddings

META = ("id", "source", "path", "member", "width", "height", "nbytes", "sha256")
BALANCED = "(balanced)"


def plan_retrieve(ctx: StageContext) -> pa.Table:
    """The decontaminate manifest; the embed_ssl and cluster commit markers ride in the schema metadata so that new
    embeddings or clusters change the fingerprint."""
    t = artifacts.read_table(ctx.require("decontaminate") / "manifest.parquet")
    upstream = {name: (artifacts.read_success(ctx.require(name)) or {}) for name in ("embed_ssl", "cluster")}
    digest = artifacts.digest({k: [v.get("fingerprint"), v.get("outputs")] for k, v in upstream.items()})
    return t.replace_schema_metadata({"upstream": digest})


def _reasons(meta: pa.Table, row_id: np.ndarray, cluster: np.ndarray, seed_set: str | None,
             seed_id: list | None, mode: str, similarity: np.ndarray | None = None,
             rank: np.ndarray | None = None) -> pa.Table:
    """One row per (image, reason): image metadata `meta` [m] plus the reason columns."""
    m = meta.num_rows
    sim = pa.array(similarity, pa.float32()) if similarity is not None else pa.nulls(m, pa.float32())
    cols = {
        "row_id": pa.array(row_id, pa.int64()),
        **{c: meta.column(c) for c in META},
        "cluster": pa.array(cluster, pa.int64()),
        "seed_set": pa.array([seed_set] * m, pa.string()),
        "seed_id": pa.array(seed_id if seed_id is not None else [None] * m, pa.string()),
        "mode": pa.array([mode] * m, pa.string()),
        "similarity": sim,
        "rank": pa.array(rank, pa.int32()) if rank is not None else pa.nulls(m, pa.int32()),
    }
    return pa.table(cols)


class Pool:
    """The embed_ssl pool: embeddings [n, d] (memmap), row ids, image metadata and finest-level clusters."""

    def __init__(self, ctx: StageContext, manifest: pa.Table) -> None:
        emb = ctx.require("embed_ssl")
        self.emb_dir = emb
        self.vectors, rows = load_embeddings(emb, "pool")
        self.row_id = rows.column("row_id").to_numpy().astype(np.int64)
        self.meta = manifest.select(list(META)).take(pa.array(self.row_id))
        self.centroids, self.assign, self.offsets, self.members = load_level(ctx.require("cluster"), 1)

    def reasons(self, idx: np.ndarray, **kw) -> pa.Table:
        """Reason rows for pool indices `idx` [m]."""
        return _reasons(self.meta.take(pa.array(idx, pa.int64())), self.row_id[idx], self.assign[idx], **kw)


def _load_seeds(pool: Pool, name: str) -> tuple[np.ndarray, pa.Table]:
    vec, tab = pool.emb_dir / f"seed-{name}.npy", pool.emb_dir / f"seed-{name}.parquet"
    if not vec.is_file() or not tab.is_file():
        raise ValueError(f"retrieve: seed set '{name}' has no embeddings in {pool.emb_dir} (seed-{name}.npy/.parquet)")
    return load_embeddings(pool.emb_dir, f"seed-{name}")


def retrieve_as_is(pool: Pool, seeds: pa.Table, s: SeedSetConfig) -> pa.Table:
    """The seed images themselves; a seed whose sha256 is in the pool is that pool image (lowest pool index)."""
    first: dict[str, int] = {}
    for i, sha in enumerate(pool.meta.column("sha256").to_pylist()):
        first.setdefault(sha, i)
    hit = np.array([first.get(sha, -1) for sha in seeds.column("sha256").to_pylist()], dtype=np.int64)
    ids = np.array(seeds.column("id").to_pylist(), dtype=object)
    inside, outside = np.flatnonzero(hit >= 0), np.flatnonzero(hit < 0)
    ones = np.ones(len(inside), dtype=np.float32)
    parts = [pool.reasons(hit[inside], seed_set=s.name, seed_id=list(ids[inside]), mode="as_is", similarity=ones)]
    m = len(outside)
    meta = seeds.select(list(META)).cast(pool.meta.schema)
    parts.append(_reasons(meta.take(pa.array(outside, pa.int64())), np.full(m, -1),
                          np.full(m, -1), s.name, list(ids[outside]), "as_is", np.ones(m, dtype=np.float32)))
    return pa.concat_tables(parts)


def retrieve_sample(pool: Pool, vectors: np.ndarray, seeds: pa.Table, s: SeedSetConfig, threads: int) -> pa.Table:
    """`n_neighbors` nearest pool images per seed image, with similarity >= `min_similarity` (exact search, one
    flat index per block of the pool, so memory stays bounded by the block whatever the pool size)."""
    k = min(s.n_neighbors, len(pool.vectors))
    sims, idx = exact_search(pool.vectors, vectors, k, KnnParams(index="flat", threads=threads))
    rank = np.broadcast_to(np.arange(k, dtype=np.int32), idx.shape)
    seed_of = np.broadcast_to(np.arange(len(idx))[:, None], idx.shape)
    ok = (idx >= 0) & (sims >= s.min_similarity)
    ids = np.array(seeds.column("id").to_pylist(), dtype=object)
    return pool.reasons(idx[ok], seed_set=s.name, seed_id=list(ids[seed_of[ok]]), mode="sample",
                        similarity=sims[ok], rank=rank[ok])


def retrieve_cluster(pool: Pool, vectors: np.ndarray, seeds: pa.Table, s: SeedSetConfig,
                     rng: np.random.Generator) -> pa.Table:
    """`per_cluster` random members of every cluster holding more than `min_seeds_in_cluster` seeds, then a seeded
    cap at `max_images`. The reason's seed is the cluster's seed closest to the centroid."""
    k = len(pool.centroids)
    lab, sim = assign(vectors, pool.centroids)
    counts = np.bincount(lab, minlength=k)
    chosen = np.flatnonzero(counts > s.min_seeds_in_cluster)
    # Closest seed per cluster: sort seeds by (cluster, -similarity, index) and take each cluster's first.
    order = np.lexsort((np.arange(len(lab)), -sim.astype(np.float64), lab))
    head = order[np.concatenate([[0], np.cumsum(counts)[:-1]])[chosen]] if chosen.size else np.zeros(0, np.int64)
    ids = np.array(seeds.column("id").to_pylist(), dtype=object)
    picked, reason_seed = [], []
    for c, seed in zip(chosen, head):
        members = pool.members[pool.offsets[c] : pool.offsets[c + 1]]
        if len(members) > s.per_cluster:
            members = np.sort(rng.choice(members, s.per_cluster, replace=False))
        picked.append(members)
        reason_seed.extend([ids[seed]] * len(members))
    idx = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    keep = np.arange(len(idx))
    if len(idx) > s.max_images:
        keep = np.sort(rng.choice(len(idx), s.max_images, replace=False))
    reason_seed = [reason_seed[i] for i in keep]
    return pool.reasons(idx[keep], seed_set=s.name, seed_id=reason_seed, mode="cluster")


def _set_rng(cfg: CurateConfig, name: str) -> np.random.Generator:
    """Per-seed-set generator: adding or reordering sets does not change another set's draws."""
    return np.random.default_rng([cfg.seed, 5, int(artifacts.digest(name), 16)])


def _reasons_json(t: pa.Table) -> list[str]:
    out = []
    for seed_set, seed_id, mode, sim, cl in zip(*(t.column(c).to_pylist() for c in
                                                  ("seed_set", "seed_id", "mode", "similarity", "cluster"))):
        r = {"seed_set": seed_set, "seed_id": seed_id, "mode": mode}
        if mode in ("cluster", "balanced"):
            r["cluster"] = cl
        else:
            r["similarity"] = round(sim, 6) if sim is not None else None
        out.append(json.dumps(r, sort_keys=True))
    return out


def union(long: pa.Table) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Deduplicate reason rows by (row_id, id).

    Seeds outside the pool all have row_id -1; among them the content (sha256) orders before the id, because ids hash
    the seed folder's path: the same seeds at another path must give the same selection order, hence the same shards.

    Returns:
        long form sorted by (row_id, sha256, id, seed_set, mode, seed_id, rank), the selected table (one row per image,
        with a `reasons` JSON list in that order) and the image index [m] of each long-form row.
    """
    keys = [(c, "ascending", "at_end") for c in ("row_id", "sha256", "id", "seed_set", "mode", "seed_id", "rank")]
    long = long.take(pc.sort_indices(long, sort_keys=keys))
    row_id = long.column("row_id").to_numpy()
    ids = np.array(long.column("id").to_pylist(), dtype=object)
    new = np.ones(len(row_id), dtype=bool)
    new[1:] = (row_id[1:] != row_id[:-1]) | (ids[1:] != ids[:-1])
    image = np.cumsum(new) - 1
    firsts = np.flatnonzero(new)
    reasons = _reasons_json(long)
    grouped = ["[" + ", ".join(reasons[a:b]) + "]" for a, b in zip(firsts, list(firsts[1:]) + [len(reasons)])]
    sel = long.take(pa.array(firsts, pa.int64())).select(["row_id", *META, "cluster"])
    sel = sel.append_column("reasons", pa.array(grouped, pa.string()))
    return long, sel, image


def _set_counts(long: pa.Table, image: np.ndarray) -> dict:
    """retrieved (reason rows), unique (images) and collisions (images also selected by another set/mode) per set."""
    sets = np.array([BALANCED if s is None else s for s in long.column("seed_set").to_pylist()], dtype=object)
    modes = np.array(long.column("mode").to_pylist(), dtype=object)
    tags = np.array([f"{a}\0{b}" for a, b in zip(sets, modes)], dtype=object)
    uniq_tags, tag_code = np.unique(tags, return_inverse=True) if len(tags) else (np.zeros(0, object), image)
    pairs = np.unique(np.stack([image, tag_code], axis=1), axis=0) if len(image) else np.zeros((0, 2), np.int64)
    owners = np.bincount(pairs[:, 0]) if len(pairs) else np.zeros(0, np.int64)
    out: dict = {}
    for code, tag in enumerate(uniq_tags):
        name, mode = tag.split("\0")
        mine = pairs[pairs[:, 1] == code, 0]
        out.setdefault(name, {})[mode] = {
            "retrieved": int(np.count_nonzero(tag_code == code)),
            "unique": int(len(mine)),
            "collisions": int(np.count_nonzero(owners[mine] > 1)),
        }
    return out


def finish_retrieve(ctx: StageContext, manifest: pa.Table) -> dict:
    """Run every seed set (and the balanced sample), take the union, write selected.parquet and retrieval.parquet."""
    cfg = ctx.cfg
    set_threads(cfg.cluster.threads)
    pool = Pool(ctx, manifest)
    parts = [pool.reasons(np.zeros(0, dtype=np.int64), seed_set=None, seed_id=None, mode="none")]
    for s in cfg.retrieve.seed_sets:
        vectors, seeds = _load_seeds(pool, s.name)
        if s.mode == "as_is":
            parts.append(retrieve_as_is(pool, seeds, s))
        elif s.mode == "sample":
            parts.append(retrieve_sample(pool, vectors, seeds, s, cfg.cluster.threads))
        else:
            parts.append(retrieve_cluster(pool, vectors, seeds, s, _set_rng(cfg, s.name)))
    if cfg.cluster.mode == "hierarchical" and cfg.cluster.balanced_size > 0:
        levels = load_hierarchy(ctx.require("cluster"))
        idx = balanced_sample(levels, cfg.cluster.balanced_size, np.random.default_rng([cfg.seed, 6]))
        parts.append(pool.reasons(idx, seed_set=None, seed_id=None, mode="balanced"))
    long, selected, image = union(pa.concat_tables(parts))
    out = ctx.stage_dir("retrieve")
    artifacts.write_parquet_atomic(out / "selected.parquet", selected)
    artifacts.write_parquet_atomic(
        out / "retrieval.parquet",
        long.select(["row_id", "id", "seed_set", "seed_id", "mode", "similarity", "cluster", "rank"]),
    )
    return {
        "inputs": len(pool.row_id),
        "outputs": selected.num_rows,
        "reasons": long.num_rows,
        "outside_pool": int(np.count_nonzero(selected.column("row_id").to_numpy() < 0)),
        "sets": _set_counts(long, image),
    }


STAGE = Stage(
    name="retrieve",
    inputs=("decontaminate", "embed_ssl", "cluster"),
    outputs=("selected.parquet", "retrieval.parquet"),
    config_sections=("retrieve", "cluster", "seed"),
    plan=plan_retrieve,
    finish=finish_retrieve,
    rules=1,  # 1: order (row_id, sha256, id) (was: row_id, id)
)
