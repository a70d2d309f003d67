"""Evaluation-set decontamination (DINOv2 A.3 relative deduplication): drop every copy component an eval image hits.

Each eval image's copy embedding queries the WHOLE embedded pool, including rows copy_dedup removed, for its
`decontaminate.k` nearest neighbours (`knn.Searcher` with the copy_dedup index settings). A neighbour with cosine
> `decontaminate.threshold` (0.45) touches its copy component (`copy_component`, the component's kept member), and
every member of a touched component is removed, the kept representative included. Rows removed earlier keep their
dup_kind but are labelled too (`contaminated_by`), as are exact / near duplicates grouped under a touched member.

Outputs: `manifest.parquet` (+ contaminated_by), `matches.parquet` (every pair above the threshold) and `audit.parquet`
(a seeded sample of borderline pairs within `decontaminate.audit_margin` of the threshold, for the report).
Resume: each eval set's pairs above the audit floor are written atomically to `_work/matches-NNN.parquet` and skipped
on a re-run.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.knn import Searcher, knn_params
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.dedup.copy_dedup import pool_row_ids, upstream_tag
from data_pipeline.embed.embed import load_embeddings, parse_eval_set

MATCH_SCHEMA = pa.schema([("eval_set", pa.string()), ("eval_id", pa.string()), ("row_id", pa.int64()),
                          ("sim", pa.float32()), ("component", pa.int64())])


def plan_decontaminate(ctx: StageContext) -> pa.Table:
    """The copy_dedup manifest, tagged with the embed_copy commit (eval vectors live there)."""
    t = artifacts.read_table(ctx.require("copy_dedup") / "manifest.parquet")
    return t.replace_schema_metadata(upstream_tag(ctx, "embed_copy"))


def match_set(searcher: Searcher, evals: np.ndarray, eval_ids: list[str], name: str, k: int, threshold: float,
              pool_rows: np.ndarray, pool_component: np.ndarray) -> pa.Table:
    """Pool neighbours of one eval set above `threshold` (the audit floor: the caller splits matches from the band).

    Args:
        evals: float16 [m, d] eval embeddings; eval_ids: [m] their ids.
        pool_rows, pool_component: int64 [n_pool] row_id and copy component of each pool vector.

    Returns:
        MATCH_SCHEMA rows in eval order, then by similarity (desc) and row_id.
    """
    sims, idx = searcher.search(evals, k)
    hit = (idx >= 0) & (sims > threshold)
    q, nb = np.nonzero(hit)
    return pa.table({
        "eval_set": pa.array([name] * q.size, pa.string()),
        "eval_id": pa.array(np.array(eval_ids, dtype=object)[q] if q.size else [], pa.string()),
        "row_id": pa.array(pool_rows[idx[q, nb]], pa.int64()),
        "sim": pa.array(sims[q, nb], pa.float32()),
        "component": pa.array(pool_component[idx[q, nb]], pa.int64()),
    }, schema=MATCH_SCHEMA)


def with_eval_paths(pairs: pa.Table, eval_rows: pa.Table | None) -> pa.Table:
    """`pairs` (MATCH_SCHEMA) plus eval_path and eval_member, looked up by eval_id in the set's embed listing."""
    where = {}
    if eval_rows is not None:
        where = dict(zip(eval_rows.column("id").to_pylist(),
                         zip(eval_rows.column("path").to_pylist(), eval_rows.column("member").to_pylist())))
    found = [where.get(e, (None, None)) for e in pairs.column("eval_id").to_pylist()]
    return (pairs.append_column("eval_path", pa.array([f[0] for f in found], pa.string()))
            .append_column("eval_member", pa.array([f[1] for f in found], pa.string())))


def audit_table(band: pa.Table, manifest: pa.Table, threshold: float, n_pairs: int, seed: int) -> pa.Table:
    """Seeded sample of at most `n_pairs` borderline (eval, pool) pairs, with hit = sim > threshold and the pool
    image's id, path and member; in set, eval id, row_id order."""
    if band.num_rows > n_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(band.num_rows, n_pairs, replace=False))
        band = band.take(pa.array(pick, pa.int64()))
    band = band.append_column("hit", pa.array(band.column("sim").to_numpy() > threshold, pa.bool_()))
    rows = band.column("row_id")
    for name in ("id", "path", "member"):
        band = band.append_column(name, manifest.column(name).take(rows).cast(pa.string()))
    return band


def finish_decontaminate(ctx: StageContext, table: pa.Table) -> dict:
    """Write manifest.parquet (plus contaminated_by), matches.parquet and audit.parquet; counts per eval set
    (removed_rows: removed by this stage; already_removed: hit rows an earlier stage or set had removed)."""
    cfg = ctx.cfg.decontaminate
    out_dir = ctx.stage_dir("decontaminate")
    work = out_dir / "_work"
    emb_dir = ctx.stage_dir("embed_copy")
    names = [parse_eval_set(e)[0] for e in cfg.eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"decontaminate.eval_sets: duplicate set names {names}")
    n_rows = table.num_rows
    keep = np.array(table.column("keep").to_pylist(), dtype=bool)
    kept_in = int(keep.sum())
    kind = table.column("dup_kind").to_pylist()
    component = table.column("copy_component").to_numpy().astype(np.int64)
    group = np.array(table.column("dup_group").to_pylist(), dtype=np.int64)
    contaminated_by: list[str | None] = [None] * n_rows
    per_set: dict[str, dict] = {}
    matches = [MATCH_SCHEMA.empty_table()]
    band = [with_eval_paths(MATCH_SCHEMA.empty_table(), None)]
    searcher = None
    for s_i, name in enumerate(names):
        if not (emb_dir / f"eval-{name}.npy").is_file():
            found = sorted(p.stem for p in emb_dir.glob("eval-*.npy"))
            raise ValueError(f"decontaminate.eval_sets entry {cfg.eval_sets[s_i]!r}: no {emb_dir}/eval-{name}.npy "
                             f"(embed_copy wrote {found}); re-run embed_copy")
        evals, eval_rows = load_embeddings(emb_dir, f"eval-{name}")
        f = work / f"matches-{s_i:03d}.parquet"
        if not f.is_file():
            if searcher is None:
                pool, rows = load_embeddings(emb_dir, "pool")
                # Pool rows copy_dedup removed are still searched, so only ids are checked here.
                pool_rows = pool_row_ids(table, rows, check_keep=False)
                searcher = Searcher(pool, knn_params(ctx.cfg.copy_dedup, seed=ctx.cfg.seed))
            if evals.shape[1:] != searcher.base.shape[1:] or evals.shape[0] != eval_rows.num_rows:
                raise ValueError(f"embed_copy eval-{name}: shape {evals.shape} / {eval_rows.num_rows} rows does not "
                                 f"fit the pool's {searcher.base.shape}; re-run embed_copy")
            k = max(1, min(cfg.k, searcher.base.shape[0]))
            floor = cfg.threshold - cfg.audit_margin  # pairs in the audit band below the threshold are kept too
            m = match_set(searcher, evals, eval_rows.column("id").to_pylist(), name, k, floor, pool_rows,
                          component[pool_rows])
            artifacts.write_parquet_atomic(f, m)
        near = artifacts.read_table(f)
        sims = near.column("sim").to_numpy()
        m = near.filter(pa.array(sims > cfg.threshold))
        band.append(with_eval_paths(near.filter(pa.array(sims <= cfg.threshold + cfg.audit_margin)), eval_rows))
        matches.append(m)
        touched = np.unique(m.column("component").to_numpy())
        hit_rows = np.flatnonzero(np.isin(component, touched) | ((component < 0) & np.isin(group, touched)))
        newly = hit_rows[keep[hit_rows]]
        keep[newly] = False
        for row in newly:
            kind[row] = "contaminated"
        for row in hit_rows:
            if contaminated_by[row] is None:  # the first set in config order names a row hit by several
                contaminated_by[row] = name
        per_set[name] = {"eval_images": int(evals.shape[0]), "matches": int(m.num_rows),
                         "matched_components": int(touched.size), "removed_rows": int(newly.size),
                         "already_removed": int(hit_rows.size - newly.size)}

    table = table.set_column(table.column_names.index("dup_kind"), "dup_kind", pa.array(kind, pa.string()))
    table = table.set_column(table.column_names.index("keep"), "keep", pa.array(keep, pa.bool_()))
    col = pa.array(contaminated_by, pa.string())
    if "contaminated_by" in table.column_names:
        table = table.set_column(table.column_names.index("contaminated_by"), "contaminated_by", col)
    else:
        table = table.append_column("contaminated_by", col)
    artifacts.write_parquet_atomic(out_dir / "manifest.parquet", table)
    artifacts.write_parquet_atomic(out_dir / "matches.parquet", pa.concat_tables(matches))
    audit = audit_table(pa.concat_tables(band), table, cfg.threshold, cfg.audit_pairs, ctx.cfg.seed)
    artifacts.write_parquet_atomic(out_dir / "audit.parquet", audit)
    shutil.rmtree(work, ignore_errors=True)
    removed = kept_in - int(keep.sum())
    if names:
        print(f"[decontaminate] removed {removed} rows; " +
              ", ".join(f"{n}: {v['matched_components']} components" for n, v in per_set.items()))
    return {
        "inputs": kept_in,
        "outputs": int(keep.sum()),
        "removed": {"contaminated": removed},
        "sets": per_set,
        "audit_band": [round(cfg.threshold + d * cfg.audit_margin, 6) for d in (-1, 0, 1)],
        "rejects": {},  # rows rejected upstream are counted by the stage that rejected them
    }


STAGE = Stage(
    name="decontaminate",
    inputs=("copy_dedup", "embed_copy"),
    outputs=("manifest.parquet", "matches.parquet", "audit.parquet"),
    config_sections=("decontaminate", "copy_dedup"),
    plan=plan_decontaminate,
    finish=finish_decontaminate,
)
