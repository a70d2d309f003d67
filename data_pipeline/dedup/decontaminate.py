"""Evaluation-set decontamination (DINOv2 A.3 relative deduplication): drop every copy component an eval image hits.

Each eval image's copy embedding queries the WHOLE embedded pool, including rows copy_dedup removed, for its
`decontaminate.k` nearest neighbours (`knn.Searcher` with the copy_dedup index settings). A neighbour with cosine
> `decontaminate.threshold` (0.45) touches its copy component (`copy_component`, the component's kept member), and
every member of a touched component is removed, the kept representative included. Rows removed earlier keep their
dup_kind but are labelled too (`contaminated_by`), as are exact / near duplicates grouped under a touched member.

Resume: each eval set's matches are written atomically to `_work/matches-NNN.parquet` and skipped on a re-run.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.knn import Searcher, knn_params
from data_pipeline.core.stage import Stage, StageContext, reject_counts
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
    """Pool neighbours of one eval set above the threshold.

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


def finish_decontaminate(ctx: StageContext, table: pa.Table) -> dict:
    """Write manifest.parquet (plus contaminated_by) and matches.parquet; counts per eval set."""
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
            m = match_set(searcher, evals, eval_rows.column("id").to_pylist(), name, k, cfg.threshold, pool_rows,
                          component[pool_rows])
            artifacts.write_parquet_atomic(f, m)
        m = artifacts.read_table(f)
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
                         "matched_components": int(touched.size), "removed_rows": int(newly.size)}

    table = table.set_column(table.column_names.index("dup_kind"), "dup_kind", pa.array(kind, pa.string()))
    table = table.set_column(table.column_names.index("keep"), "keep", pa.array(keep, pa.bool_()))
    col = pa.array(contaminated_by, pa.string())
    if "contaminated_by" in table.column_names:
        table = table.set_column(table.column_names.index("contaminated_by"), "contaminated_by", col)
    else:
        table = table.append_column("contaminated_by", col)
    artifacts.write_parquet_atomic(out_dir / "manifest.parquet", table)
    artifacts.write_parquet_atomic(out_dir / "matches.parquet", pa.concat_tables(matches))
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
        "rejects": reject_counts(table),
    }


STAGE = Stage(
    name="decontaminate",
    inputs=("copy_dedup", "embed_copy"),
    outputs=("manifest.parquet", "matches.parquet"),
    config_sections=("decontaminate", "copy_dedup"),
    plan=plan_decontaminate,
    finish=finish_decontaminate,
)
