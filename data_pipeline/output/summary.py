"""The report's numbers, derived from the stage artifacts (manifests first), never from stage-reported totals alone.

Manifests are row-aligned (row_id order) from ingest to decontaminate, and each carries `status` and, from
exact_dedup on, `keep` and `dup_kind`. Comparing consecutive manifests gives what each stage did itself:

- rejects at a stage: rows that stage's manifest rejects and the previous one did not (decode no longer repeats the
  ingest rejects, and no later stage repeats the decode rejects);
- removals at a stage: rows kept by the previous manifest and not by this one, by the dup_kind this stage set;
- decontamination per evaluation set: rows removed by that stage (dup_kind 'contaminated') apart from rows in a
  touched component that an earlier stage had already removed.

Stages without a manifest (phash, embed_*, cluster, retrieve, shards) report their own counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.core import artifacts

MANIFEST_CHAIN = ("ingest", "decode", "exact_dedup", "near_dedup", "copy_dedup", "decontaminate")
NEAR_KINDS = ("exact_bytes", "exact_pixels", "near")
COPY_KINDS = ("copy",)


def read_manifest(out_dir: Path, stage: str, columns: tuple[str, ...] = ()) -> pa.Table | None:
    """The stage's manifest (only `columns` that exist, when given), or None when the stage has none."""
    path = out_dir / stage / "manifest.parquet"
    if artifacts.read_success(out_dir / stage) is None or not path.is_file():
        return None
    table = artifacts.read_table(path)
    return table.select([c for c in columns if c in table.column_names]) if columns else table


def _bools(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _strings(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).fill_null("").to_pylist(), dtype=object)


def _counts(values: np.ndarray) -> dict[str, int]:
    """{value: count} of the non-empty values, sorted by value."""
    keys, counts = np.unique(values[values != ""].astype(str), return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts)}


def manifest_funnel(out_dir: Path) -> dict[str, dict]:
    """Per manifest stage: inputs (rows kept by the previous manifest; ingest: rows listed), outputs (rows kept),
    rejects (new rejects by reason) and removed (new removals by dup_kind)."""
    out: dict[str, dict] = {}
    prev_ok = prev_kept = None
    for stage in MANIFEST_CHAIN:
        m = read_manifest(out_dir, stage, ("status", "reject_reason", "keep", "dup_kind"))
        if m is None or "status" not in m.column_names:
            continue
        ok = _strings(m, "status") == "ok"
        kept = ok & _bools(m, "keep") if "keep" in m.column_names else ok
        if prev_ok is not None and prev_ok.shape != ok.shape:
            raise ValueError(f"report: {stage}/manifest.parquet has {ok.size} rows, the previous manifest "
                             f"{prev_ok.size}; the stages come from different runs")
        new_reject = ~ok if prev_ok is None else ~ok & prev_ok
        entry = {"inputs": int(ok.size if prev_kept is None else prev_kept.sum()), "outputs": int(kept.sum()),
                 "rejects": _counts(_strings(m, "reject_reason")[new_reject]) if "reject_reason" in m.column_names
                 else {}, "removed": {}}
        if prev_kept is not None and "dup_kind" in m.column_names:
            entry["removed"] = _counts(_strings(m, "dup_kind")[prev_kept & ~kept & ok])
        out[stage] = entry
        prev_ok, prev_kept = ok, kept
    return out


def decontamination_counts(out_dir: Path) -> dict[str, dict[str, int]] | None:
    """Per evaluation set (the first set in config order that touched the row): rows this stage removed, and rows of
    touched components that earlier stages had already removed."""
    m = read_manifest(out_dir, "decontaminate", ("contaminated_by", "dup_kind", "keep"))
    if m is None or "contaminated_by" not in m.column_names:
        return None
    by = _strings(m, "contaminated_by")
    here = (_strings(m, "dup_kind") == "contaminated") & ~_bools(m, "keep")
    out = {}
    for name in sorted(set(by[by != ""].tolist())):
        hit = by == name
        out[str(name)] = {"removed_here": int((hit & here).sum()), "already_removed": int((hit & ~here).sum())}
    return out


def copy_group_sizes(out_dir: Path) -> dict[str, int] | None:
    """{group size: number of copy groups} over the embedded rows (copy_component = the group's kept row)."""
    m = read_manifest(out_dir, "copy_dedup", ("copy_component",))
    if m is None or "copy_component" not in m.column_names:
        return None
    comp = np.asarray(m.column("copy_component").to_numpy(zero_copy_only=False), dtype=np.int64)
    sizes = np.unique(comp[comp >= 0], return_counts=True)[1]
    hist = np.unique(sizes, return_counts=True)
    return {str(int(s)): int(c) for s, c in zip(*hist)}


def giant_components(out_dir: Path) -> dict[str, dict]:
    """The giant-component reports of the dedup stages' components.json, by stage."""
    out = {}
    for stage in ("near_dedup", "copy_dedup"):
        path = out_dir / stage / "components.json"
        if artifacts.read_success(out_dir / stage) is not None and path.is_file():
            giant = json.loads(path.read_text()).get("giant")
            if giant is not None:
                out[stage] = giant
    return out


# ----------------------------------------------------------------------------------------- groups to audit


def _row_of_ids(manifest: pa.Table, ids: np.ndarray) -> np.ndarray:
    """Row index of each id in `manifest` (-1 when absent)."""
    idx = pc.index_in(pa.array(ids.astype(str).tolist(), pa.string()), value_set=manifest.column("id"))
    return np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _hamming(manifest: pa.Table, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    h = np.asarray(manifest.column("phash").fill_null(0).to_numpy(zero_copy_only=False), dtype=np.uint64)
    x = (h[rows] ^ h[targets]).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(x, axis=1).sum(axis=1).astype(np.float64)


def _edge_sims(edges: pa.Table, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Similarity of each (row, target) pair from an edge list (i < j); NaN when the pair is not an edge."""
    key = edges.column("i").to_numpy().astype(np.int64) * (1 << 32) + edges.column("j").to_numpy().astype(np.int64)
    order = np.argsort(key)
    key, sim = key[order], edges.column("sim").to_numpy()[order]
    want = np.minimum(rows, targets) * (1 << 32) + np.maximum(rows, targets)
    sims = np.full(rows.size, np.nan)
    if key.size:
        pos = np.clip(np.searchsorted(key, want), 0, key.size - 1)
        hit = key[pos] == want
        sims[hit] = sim[pos[hit]]
    return sims


def member_distances(out_dir: Path, stage: str, manifest: pa.Table, rows: np.ndarray) -> np.ndarray:
    """Distance of each removed row to the image it was removed in favour of (dup_of): Hamming bits at near_dedup
    (0 for exact copies), cosine at copy_dedup; NaN when unknown."""
    targets = _row_of_ids(manifest, _strings(manifest, "dup_of")[rows])
    dist = np.full(rows.size, np.nan)
    known = targets >= 0
    kind = _strings(manifest, "dup_kind")[rows]
    if stage == "near_dedup":
        dist[np.char.startswith(kind.astype(str), "exact")] = 0.0
        near = known & (kind == "near")
        if "phash" in manifest.column_names and near.any():
            dist[near] = _hamming(manifest, rows[near], targets[near])
    else:
        edges_path = out_dir / stage / "edges.parquet"
        if edges_path.is_file() and known.any():
            dist[known] = _edge_sims(artifacts.read_table(edges_path), rows[known], targets[known])
    return dist


def audit_groups(out_dir: Path, stage: str, kinds: tuple[str, ...], n_groups: int) -> dict[str, list[dict]] | None:
    """The groups most useful to audit at one dedup level: the largest, and those with the loosest member (largest
    Hamming distance at near_dedup, lowest cosine at copy_dedup) to the image it was removed in favour of.

    Returns:
        {"largest": [...], "loosest": [...]}, each group {"kept": row, "size": removed rows, "loosest": distance,
        "members": [[row, dup_kind, distance], ...] loosest first}; None without a manifest.
    """
    manifest = read_manifest(out_dir, stage)
    if manifest is None or not all(c in manifest.column_names for c in ("id", "dup_kind", "dup_group", "keep")):
        return None
    removed = np.isin(_strings(manifest, "dup_kind"), kinds) & ~_bools(manifest, "keep")
    rows = np.flatnonzero(removed)
    group = np.asarray(manifest.column("dup_group").fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)[rows]
    rows, group = rows[group >= 0], group[group >= 0]
    dist = member_distances(out_dir, stage, manifest, rows)
    loose = dist if stage == "near_dedup" else -dist  # larger = looser
    kinds_of = _strings(manifest, "dup_kind")
    groups = []
    for g in np.unique(group):
        sel = group == g
        order = np.argsort(-np.nan_to_num(loose[sel], nan=-np.inf), kind="stable")
        members = [[int(r), str(kinds_of[r]), None if np.isnan(d) else round(float(d), 4)]
                   for r, d in zip(rows[sel][order], dist[sel][order])]
        worst = np.nanmax(loose[sel]) if np.isfinite(loose[sel]).any() else -np.inf
        groups.append({"kept": int(g), "size": int(sel.sum()), "loosest": members[0][2], "_key": float(worst)})
        groups[-1]["members"] = members
    largest = sorted(groups, key=lambda x: (-x["size"], x["kept"]))[:n_groups]
    loosest = sorted(groups, key=lambda x: (-x["_key"], -x["size"], x["kept"]))[:n_groups]
    strip = [{k: v for k, v in x.items() if k != "_key"} for x in groups]
    by_kept = {x["kept"]: x for x in strip}
    return {"largest": [by_kept[x["kept"]] for x in largest], "loosest": [by_kept[x["kept"]] for x in loosest]}
