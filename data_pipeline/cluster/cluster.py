"""Stage `cluster`: spherical k-means (flat) or hierarchical k-means with resampling on the embed_ssl pool.

Outputs (pool index = row of embed_ssl/pool.npy): `centroids.npy` float32 [k, d], `assign.npy` int64 [n], CSR
`offsets.npy` int64 [k + 1] + `members.npy` int64 [n] (pool indices grouped by cluster, closest to the centroid
first, then by index). Hierarchical mode also writes `level<L>/` with the same four files per level; level1 is the
finest (same files as the top level), and for L > 1 `assign` maps level L-1 clusters to level L clusters.
Every k-means run checkpoints under `_work/` after each iteration, so a killed run resumes to identical outputs.
Assignments run in slices of `cluster.slice_rows` points (`kmeans.Slicing`): in this process, or as one SLURM job
array per Lloyd iteration and per whole-pool assignment with `executor.kind: slurm`; the same bytes either way.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.cluster.kmeans import (
    Checkpointer,
    Level,
    Slicing,
    assign_all,
    budget_points,
    cluster_csr,
    hierarchical_kmeans,
    set_threads,
    spherical_kmeans,
)
from data_pipeline.core import artifacts
from data_pipeline.core.executors import slice_runner
from data_pipeline.core.stage import Stage, StageContext

log = logging.getLogger(__name__)
OUTPUTS = ("centroids.npy", "assign.npy", "offsets.npy", "members.npy")


def plan_cluster(ctx: StageContext) -> pa.Table:
    """embed_ssl's pool rows (row_id, id); the pool.npy checksum rides in the schema metadata so that new
    embeddings for the same rows change the fingerprint."""
    d = ctx.require("embed_ssl")
    rows = artifacts.read_table(d / "pool_rows.parquet")
    sha = (artifacts.read_success(d) or {}).get("outputs", {}).get("pool.npy") or artifacts.file_sha256(d / "pool.npy")
    return rows.replace_schema_metadata({"pool.npy": sha})


def write_level(out: Path, level: Level) -> None:
    """The four per-level files of one level."""
    offsets, members = cluster_csr(level.assign, level.sims, len(level.centroids))
    artifacts.write_npy_atomic(out / "centroids.npy", level.centroids.astype(np.float32))
    artifacts.write_npy_atomic(out / "assign.npy", level.assign.astype(np.int64))
    artifacts.write_npy_atomic(out / "offsets.npy", offsets)
    artifacts.write_npy_atomic(out / "members.npy", members)


def load_level(stage_dir: Path, level: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, assign, offsets, members) of a finished cluster stage; level 1 = the top-level files."""
    d = stage_dir if level == 1 else stage_dir / f"level{level}"
    return tuple(np.load(d / name) for name in OUTPUTS)  # type: ignore[return-value]


def load_hierarchy(stage_dir: Path) -> list[Level]:
    """Every level of a finished cluster stage, finest first, as needed by `kmeans.balanced_sample` (`sims` are not
    stored on disk and come back as zeros)."""
    levels = []
    li = 1
    while li == 1 or (stage_dir / f"level{li}").is_dir():
        cent, lab, _, _ = load_level(stage_dir, li)
        levels.append(Level(cent, lab, np.zeros(len(lab), dtype=np.float32)))
        li += 1
    return levels


def _sizes(labels: np.ndarray, k: int) -> dict:
    s = np.bincount(labels, minlength=k)
    return {"min": int(s.min()), "median": float(np.median(s)), "max": int(s.max()), "empty": int((s == 0).sum())}


def finish_cluster(ctx: StageContext, table: pa.Table) -> dict:
    """Cluster the pool and write the CSR outputs (and `level<L>/` in hierarchical mode)."""
    cfg = ctx.cfg.cluster
    set_threads(cfg.threads)
    out = ctx.stage_dir("cluster")
    pool = np.load(ctx.require("embed_ssl") / "pool.npy", mmap_mode="r")
    n = len(pool)
    if n == 0:
        raise ValueError("cluster: the embed_ssl pool is empty; nothing to cluster")
    ckpt = Checkpointer(out / "_work")
    slicing = Slicing(slice_runner(ctx.cfg, ctx.output_dir / "_executor" / "cluster"), out / "_work", cfg.slice_rows,
                      cfg.threads)
    max_points = budget_points(cfg.memory_budget_gb, pool.shape[1])
    requested = [cfg.n_clusters] if cfg.mode == "kmeans" else list(cfg.levels)
    if requested[0] > n:
        log.warning("cluster: %d clusters requested for %d pool images; capped at %d", requested[0], n, n)
    if cfg.mode == "kmeans":
        k = min(cfg.n_clusters, n)
        res = spherical_kmeans(pool, k, iterations=cfg.iterations, init=cfg.init, seed=[ctx.cfg.seed, 1, 0],
                               max_points_per_centroid=cfg.max_points_per_centroid, max_points=max_points,
                               checkpoint=ckpt, tag="level1_step0", device=cfg.device, slicing=slicing)
        labels, sims = assign_all(pool, res.centroids, cfg.device, slicing, "level1_step0")
        levels = [Level(res.centroids, labels, sims, 0, float(np.sum(1.0 - sims.astype(np.float64))))]
    else:
        levels = hierarchical_kmeans(pool, cfg.levels, iterations=cfg.iterations, init=cfg.init, seed=ctx.cfg.seed,
                                     resample_steps=cfg.resample_steps, resample_size=cfg.resample_size,
                                     max_points_per_centroid=cfg.max_points_per_centroid, max_points=max_points,
                                     checkpoint=ckpt, device=cfg.device, slicing=slicing)
    write_level(out, levels[0])
    if cfg.mode == "hierarchical":
        for li, level in enumerate(levels, start=1):
            write_level(out / f"level{li}", level)
    # Checkpoints are only for resuming this run; the outputs now hold everything.
    shutil.rmtree(out / "_work", ignore_errors=True)
    per_level = [
        {"level": li, "requested": int(req), "clusters": len(lv.centroids), "inputs": len(lv.assign),
         "resample_size": lv.resample_size, "objective": round(lv.objective, 4),
         "sizes": _sizes(lv.assign, len(lv.centroids))}
        for li, (req, lv) in enumerate(zip(requested, levels), start=1)
    ]
    return {
        "inputs": n,
        "outputs": n,
        "clusters": len(levels[0].centroids),
        "sizes": per_level[0]["sizes"],
        "empty_clusters": per_level[0]["sizes"]["empty"],
        "levels": per_level,
    }


STAGE = Stage(
    name="cluster",
    inputs=("embed_ssl",),
    outputs=OUTPUTS,
    config_sections=("cluster", "seed"),
    plan=plan_cluster,
    finish=finish_cluster,
)
