"""Evaluation-set decontamination (DINOv2 A.3 relative deduplication): drop every copy component an eval image hits.

Each eval image's copy embedding queries the WHOLE embedded pool, including rows copy_dedup removed, for its
`decontaminate.k` nearest neighbours (`knn.Searcher` with the copy_dedup index settings, but `decontaminate.nprobe`
IVF lists per query: eval images are few, so probing 8x copy_dedup's lists costs little, and a neighbour missed
here is a test image left in the training data). A neighbour with cosine > `decontaminate.threshold` (0.45)
touches its copy component (`copy_component`, the component's kept member), and every member of a touched component
is removed, the kept representative included. Rows removed earlier keep their dup_kind but are labelled too
(`contaminated_by`), as are exact / near duplicates grouped under a touched member.

Outputs: `manifest.parquet` (+ contaminated_by), `matches.parquet` (every pair above the threshold) and `audit.parquet`
(a seeded sample of borderline pairs within `decontaminate.audit_margin` of the threshold, for the report).
Resume and scale-out: the pool index is copy_dedup's own. Both stages search the same vectors (embed_copy's whole
pool: copy_dedup queries it with itself, this stage with the eval images; nothing copy_dedup removed is dropped from
it) with the same `copy_dedup` index settings and global seed, so the IVF index copy_dedup trained and kept as
`D/copy_dedup/index-<fingerprint>.faiss` (`copy_dedup.shared_index_file`) is loaded instead of trained again. The
file's name is computed here from embed_copy's commit, the pool's shape and the index settings, so a file left by
another pool or config is never picked up; without one (a flat index, or copy_dedup run by an older version) the
index is trained as before and written to `_work/index.faiss`. Each eval set is searched in slices of
`copy_dedup.slice_rows` eval images, here or as a SLURM job array (`executors.run_slices`), each slice's pairs above
the audit floor written atomically to `_work/matches-NNN-<start>-<stop>.parquet` and skipped on a re-run.
With an approximate index (large pools, see `knn.resolve_kind`) the recall of the approximate step against exact
search is measured on `copy_dedup.recall_sample` seeded eval images of each set, printed, and written to the stats
(`recall`: exact neighbours above the threshold that the index found; `recall_at_k`), through `_work/recall-NNN.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.core import artifacts
from data_pipeline.core.executors import SliceTask, slice_runner
from data_pipeline.core.knn import Searcher, knn_params, measure_recalls
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.dedup.copy_dedup import SharedIndex, pool_row_ids, shared_index_file, upstream_tag
from data_pipeline.embed.embed import load_embeddings, parse_eval_set

MATCH_SCHEMA = pa.schema([("eval_set", pa.string()), ("eval_id", pa.string()), ("row_id", pa.int64()),
                          ("sim", pa.float32()), ("component", pa.int64())])


def plan_decontaminate(ctx: StageContext) -> pa.Table:
    """The copy_dedup manifest, tagged with the embed_copy commit (eval vectors live there)."""
    t = artifacts.read_table(ctx.require("copy_dedup") / "manifest.parquet")
    return t.replace_schema_metadata(upstream_tag(ctx, "embed_copy"))


def match_slice(shared: SharedIndex, evals_ref: str | np.ndarray, start: int, stop: int, k: int, floor: float,
                out_path: str) -> None:
    """One slice task: pool neighbours of eval rows [start, stop) with similarity above `floor`, written atomically
    as (q: eval row, p: pool index, sim), in eval order, then by similarity (desc) and pool index."""
    evals = artifacts.open_array_ref(evals_ref)
    sims, idx = shared.searcher().search(evals[start:stop], k)
    q, nb = np.nonzero((idx >= 0) & (sims > floor))
    artifacts.write_parquet_atomic(Path(out_path), pa.table({
        "q": pa.array(q.astype(np.int64) + start, pa.int64()),
        "p": pa.array(idx[q, nb], pa.int64()),
        "sim": pa.array(sims[q, nb], pa.float32()),
    }))


def match_table(raw: pa.Table, eval_ids: list[str], name: str, pool_rows: np.ndarray,
                pool_component: np.ndarray) -> pa.Table:
    """Slice pairs (q, p, sim) as MATCH_SCHEMA rows: eval ids, pool row_ids and copy components looked up here, so
    that the slice tasks carry no pool-sized tables."""
    q, p = raw.column("q").to_numpy(), raw.column("p").to_numpy()
    return pa.table({
        "eval_set": pa.array([name] * q.size, pa.string()),
        "eval_id": pa.array(np.array(eval_ids, dtype=object)[q] if q.size else [], pa.string()),
        "row_id": pa.array(pool_rows[p], pa.int64()),
        "sim": raw.column("sim"),
        "component": pa.array(pool_component[p], pa.int64()),
    }, schema=MATCH_SCHEMA)


def set_recall(searcher: Searcher, evals: np.ndarray, k: int, ctx: StageContext) -> dict:
    """Recall of the search against exact search on a seeded sample of eval images (1.0, "exact" for a flat index).

    `recall` counts the exact neighbours above `decontaminate.threshold` (the pairs that decide removals) that the
    index returned; `recall_at_k` counts all k.
    """
    out = {"index": searcher.kind, "index_bytes": int(searcher.nbytes)}
    if searcher.kind == "flat":
        return {**out, "recall": 1.0, "recall_at_k": 1.0, "recall_method": "exact"}
    sample = ctx.cfg.copy_dedup.recall_sample
    rc = (searcher.base, k, searcher.params, sample, ctx.cfg.seed, evals)
    edges, at_k = measure_recalls(*rc, searcher=searcher, min_sims=(ctx.cfg.decontaminate.threshold, None))
    return {**out, "recall": round(edges, 6), "recall_at_k": round(at_k, 6),
            "recall_method": f"sampled:{min(sample, evals.shape[0])}"}


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


def pool_index(ctx: StageContext, pool: np.ndarray, work: Path) -> SharedIndex:
    """The pool's index: copy_dedup's trained file when its fingerprint matches this pool and these settings, else
    built here (an IVF index then written to `work/index.faiss`, for resume and the SLURM slices); searched with
    `decontaminate.nprobe` lists per eval image (the probes do not change the trained index, so the file is
    shared)."""
    params = knn_params(ctx.cfg.copy_dedup, seed=ctx.cfg.seed)
    reused = shared_index_file(ctx, pool, params)
    search = replace(params, nprobe=ctx.cfg.decontaminate.nprobe)
    return SharedIndex.build(pool, search, reused if reused.is_file() else work / "index.faiss")


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
    shared = None
    pool, rows = load_embeddings(emb_dir, "pool")
    # Pool rows copy_dedup removed are still searched, so only ids are checked here.
    pool_rows = pool_row_ids(table, rows, check_keep=False)
    run = slice_runner(ctx.cfg, ctx.output_dir / "_executor" / "decontaminate")
    step = ctx.cfg.copy_dedup.slice_rows
    for s_i, name in enumerate(names):
        if not (emb_dir / f"eval-{name}.npy").is_file():
            found = sorted(p.stem for p in emb_dir.glob("eval-*.npy"))
            raise ValueError(f"decontaminate.eval_sets entry {cfg.eval_sets[s_i]!r}: no {emb_dir}/eval-{name}.npy "
                             f"(embed_copy wrote {found}); re-run embed_copy")
        evals, eval_rows = load_embeddings(emb_dir, f"eval-{name}")
        if evals.shape[1:] != pool.shape[1:] or evals.shape[0] != eval_rows.num_rows:
            raise ValueError(f"embed_copy eval-{name}: shape {evals.shape} / {eval_rows.num_rows} rows does not "
                             f"fit the pool's {pool.shape}; re-run embed_copy")
        k = max(1, min(cfg.k, pool.shape[0]))
        floor = cfg.threshold - cfg.audit_margin  # pairs in the audit band below the threshold are kept too
        bounds = [(start, min(evals.shape[0], start + step)) for start in range(0, evals.shape[0], step)]
        outs = [work / f"matches-{s_i:03d}-{a:012d}-{b:012d}.parquet" for a, b in bounds]
        if shared is None and not all(f.is_file() for f in outs):
            # Built only when some slice is missing: a resumed run with every slice done trains nothing.
            shared = pool_index(ctx, pool, work)
        ref = artifacts.array_ref(evals)
        tasks = [SliceTask(i, match_slice, (shared, ref, a, b, k, floor), str(f))
                 for i, ((a, b), f) in enumerate(zip(bounds, outs))]
        run(tasks, f"decontaminate {name}")
        near = MATCH_SCHEMA.empty_table()
        if tasks:
            raw = pa.concat_tables([artifacts.read_table(f) for f in outs])
            near = match_table(raw, eval_rows.column("id").to_pylist(), name, pool_rows, component[pool_rows])
        recall_file = work / f"recall-{s_i:03d}.json"
        if not recall_file.is_file():
            if shared is None:
                shared = pool_index(ctx, pool, work)
            artifacts.write_json_atomic(recall_file, set_recall(shared.searcher(), evals, k, ctx))
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
                         "already_removed": int(hit_rows.size - newly.size),
                         **json.loads(recall_file.read_text())}

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
              ", ".join(f"{n}: {v['matched_components']} components, index {v['index']}, recall (cos > "
                        f"{cfg.threshold}) {v['recall']:.4f}, recall@k {v['recall_at_k']:.4f} ({v['recall_method']})"
                        for n, v in per_set.items()))
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
