"""Stage "report": `report.json` (numbers) and `report.html` (tables, thumbnails, plots) over every finished stage.

The report reads whatever exists: each present stage's `_SUCCESS.json` / `stats.json`, and, when present, the
manifests (funnel, rejects and removals per stage, duplicate groups, decontamination: `summary.py` derives every
count from them), the dedup stages' edges.parquet / components.json (group distances, giant components), the
audit.parquet borderline pairs of copy_dedup and decontaminate, cluster/offsets.npy, retrieve/selected.parquet
(+ retrieval.parquet) and shards/index.json. A missing artifact only drops its section. Plots are matplotlib (Agg)
PNGs in `img/`; thumbnails are decoded with the same safe decoder as stage 2 and inlined as JPEG data URIs, so the
page needs only `img/`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig
from data_pipeline.core.stage import Stage, StageContext
from data_pipeline.ingest.decode import DecodeReject, decode_rgb
from data_pipeline.ingest.ingest import read_item_bytes
from data_pipeline.output.summary import (
    COPY_KINDS,
    NEAR_KINDS,
    audit_groups,
    copy_group_sizes,
    decontamination_counts,
    giant_components,
    manifest_funnel,
)

PIPELINE = ("ingest", "decode", "exact_dedup", "phash", "near_dedup", "embed_copy", "copy_dedup", "decontaminate",
            "embed_ssl", "cluster", "retrieve", "shards")
# Later manifests carry every earlier column, so the last present one has the most complete dup_kind.
MANIFEST_STAGES = ("decontaminate", "copy_dedup", "near_dedup", "exact_dedup")
BALANCED = "(balanced sample)"
THUMB_COLUMNS = ("id", "path", "member", "width", "height")
MAX_PER_GROUP = 6
MAX_NEIGHBOURS = 8
_PNG_META = {"Software": None}  # no library version in the PNG: same inputs give the same bytes


def present_stages(out_dir: Path) -> list[str]:
    """Finished stages under `out_dir`: pipeline order first, then any other committed stage (sorted)."""
    found = [s for s in PIPELINE if artifacts.read_success(out_dir / s) is not None]
    others = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name not in PIPELINE and p.name != "report"
                    and artifacts.read_success(p) is not None) if out_dir.is_dir() else []
    return found + others


def plan_report(ctx: StageContext) -> pa.Table:
    """One row per finished stage (stage, fingerprint): the report is redone whenever any of them changes."""
    names = present_stages(ctx.output_dir)
    fps = [artifacts.read_success(ctx.stage_dir(n))["fingerprint"] for n in names]
    return pa.table({"stage": pa.array(names, pa.string()), "fingerprint": pa.array(fps, pa.string())})


def _read_optional(path: Path) -> pa.Table | None:
    return artifacts.read_table(path) if path.is_file() else None


def _has(table: pa.Table | None, *columns: str) -> bool:
    """True when `table` exists and has every column (upstream stages of other versions may lack some)."""
    return table is not None and all(c in table.column_names for c in columns)


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Counts of the non-null, non-empty values, sorted by value."""
    vc = pc.value_counts(column.drop_null()).to_pylist()
    return dict(sorted((str(d["values"]), int(d["counts"])) for d in vc if d["values"] != ""))


def retrieval_table(retrieve_dir: Path) -> pa.Table | None:
    """Long form, one row per (selected image, reason): id, seed_set, seed_id, mode, similarity (float64), cluster.

    From retrieval.parquet when it has those columns, else from selected.parquet's `reasons` JSON (the contract).
    The balanced cluster sample (no seed set) gets the seed_set name BALANCED.
    """
    cols = ("id", "seed_set", "seed_id", "mode", "similarity", "cluster")
    long = _read_optional(retrieve_dir / "retrieval.parquet")
    if _has(long, *cols):
        long = long.select(list(cols))
    else:
        selected = _read_optional(retrieve_dir / "selected.parquet")
        if not _has(selected, "id", "reasons"):
            return None
        rows = [{"id": item_id, **{c: r.get(c) for c in cols[1:]}}
                for item_id, reasons in zip(selected.column("id").to_pylist(), selected.column("reasons").to_pylist())
                for r in (json.loads(reasons) if reasons else [])]
        schema = pa.schema([("id", pa.string()), ("seed_set", pa.string()), ("seed_id", pa.string()),
                            ("mode", pa.string()), ("similarity", pa.float64()), ("cluster", pa.int64())])
        long = pa.Table.from_pylist(rows, schema=schema)
    long = long.set_column(1, "seed_set", pc.fill_null(long.column("seed_set").cast(pa.string()), BALANCED))
    return long.set_column(4, "similarity", long.column("similarity").cast(pa.float64()))


def collect(out_dir: Path, n_groups: int = 8) -> dict:
    """Everything in report.json: per-stage counts (inputs, outputs, rejects and removals derived from the manifests
    where a stage has one), dup kinds, copy groups, giant components, groups to audit, audit bands,
    decontamination, cluster sizes, retrieval per seed set and mode, shards."""
    funnel = manifest_funnel(out_dir)
    stages = []
    for name in present_stages(out_dir):
        counts = artifacts.read_success(out_dir / name)["counts"]
        stats_path = out_dir / name / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        own = funnel.get(name, {"inputs": counts.get("inputs"), "outputs": counts.get("outputs"),
                                "rejects": counts.get("rejects") or {}, "removed": counts.get("removed") or {}})
        stages.append({"stage": name, **own, "seconds": stats.get("seconds"), "counts": counts})
    rep: dict = {"stages": stages, "rejects": {s["stage"]: s["rejects"] for s in stages if s["rejects"]},
                 "removed": {s["stage"]: s["removed"] for s in stages if s["removed"]}}
    names = {s["stage"] for s in stages}
    for name in MANIFEST_STAGES:
        m = _read_optional(out_dir / name / "manifest.parquet") if name in names else None
        if _has(m, "dup_kind", "keep"):
            removed = m.filter(pc.invert(m.column("keep").fill_null(False)))
            rep["dup_kinds"] = {"from": name, **_value_counts(removed.column("dup_kind"))}
            break
    sizes = copy_group_sizes(out_dir)
    if sizes is not None:
        rep["copy_components"] = sizes
    giants = giant_components(out_dir)
    if giants:
        rep["giant_components"] = giants
    groups = {stage: audit_groups(out_dir, stage, kinds, n_groups)
              for stage, kinds in (("near_dedup", NEAR_KINDS), ("copy_dedup", COPY_KINDS)) if stage in names}
    rep["audit_groups"] = {k: v for k, v in groups.items() if v is not None}
    bands = {s["stage"]: s["counts"]["audit_band"] for s in stages if "audit_band" in s["counts"]}
    if bands:
        rep["audit_bands"] = bands
    decon = decontamination_counts(out_dir)
    if decon is not None:
        rep["decontamination"] = decon
    offsets = out_dir / "cluster" / "offsets.npy"
    if "cluster" in names and offsets.is_file():
        sizes = np.diff(np.load(offsets))
        rep["cluster_sizes"] = {"clusters": int(sizes.size), "empty": int((sizes == 0).sum()),
                                "min": int(sizes.min()) if sizes.size else 0, "max": int(sizes.max(initial=0)),
                                "mean": float(sizes.mean()) if sizes.size else 0.0,
                                "median": float(np.median(sizes)) if sizes.size else 0.0}
    long = retrieval_table(out_dir / "retrieve") if "retrieve" in names else None
    if long is not None:
        agg = long.group_by(["seed_set", "mode"]).aggregate([("id", "count"), ("id", "count_distinct")])
        per: dict = {}
        for r in sorted(agg.to_pylist(), key=lambda r: (r["seed_set"], str(r["mode"]))):
            per.setdefault(r["seed_set"], {})[str(r["mode"])] = {"reasons": r["id_count"],
                                                                 "images": r["id_count_distinct"]}
        rep["retrieval"] = per
    index = out_dir / "shards" / "index.json"
    if "shards" in names and index.is_file():
        idx = json.loads(index.read_text())
        rep["shards"] = {k: idx.get(k) for k in ("nshards", "nsamples", "total_bytes", "selected", "rejects",
                                                 "pattern", "order")}
    return rep


class Thumbs:
    """Thumbnails as JPEG data URIs (None when the item cannot be read or decoded); source tars stay open."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg, self.tars, self.made = cfg, {}, 0

    def uri(self, path: str | None, member: str | None) -> str | None:
        if not path:
            return None
        try:
            rgb, _, _ = decode_rgb(read_item_bytes(path, member, self.tars), self.cfg.decode)
        except (OSError, KeyError, tarfile.TarError, DecodeReject):
            return None
        from PIL import Image

        im = Image.fromarray(rgb)
        side = self.cfg.report.thumb_size
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        self.made += 1
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    def close(self) -> None:
        for tf in self.tars.values():
            tf.close()


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _figure(img_dir: Path, name: str, draw) -> str:
    """Draw with `draw(ax)` into img/<name>; returns the relative path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    draw(ax)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / name, format="png", metadata=_PNG_META)
    plt.close(fig)
    return f"img/{name}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _tile(uri: str | None, caption: str, css: str = "") -> str:
    img = f'<img src="{uri}" alt="">' if uri else '<div class="missing">unreadable</div>'
    return f'<figure class="{css}">{img}<figcaption>{_e(caption)}</figcaption></figure>'


def _row(manifest: pa.Table, row: int) -> dict:
    return manifest.slice(row, 1).select(list(THUMB_COLUMNS)).to_pylist()[0]


def _row_tile(thumbs: Thumbs, r: dict, label: str, css: str = "") -> str:
    return _tile(thumbs.uri(r["path"], r["member"]), f"{label} {r['id']} {r['width']}x{r['height']}", css)


def _distance_label(stage: str, kind: str, dist: float | None) -> str:
    if dist is None:
        return f"{kind}:"
    return f"{kind} cos {dist:.3f}" if stage == "copy_dedup" else f"{kind} {int(dist)} bits"


def _groups_section(out_dir: Path, stage: str, groups: dict[str, list[dict]], title: str, thumbs: Thumbs) -> str:
    """Largest groups and loosest groups of one dedup level: kept image first, then removed ones, loosest first."""
    manifest = _read_optional(out_dir / stage / "manifest.parquet")
    if not _has(manifest, *THUMB_COLUMNS):
        return ""
    parts = [f"<h3>{_e(title)}</h3>"]
    for which, caption in (("largest", "largest groups"), ("loosest", "loosest groups (farthest member first)")):
        parts.append(f"<h4>{_e(caption)}</h4>")
        if not groups[which]:
            parts.append("<p>none</p>")
        for g in groups[which]:
            tiles = [_row_tile(thumbs, _row(manifest, g["kept"]), f"kept (+{g['size']})", "kept")]
            tiles += [_row_tile(thumbs, _row(manifest, r), _distance_label(stage, kind, d), "removed")
                      for r, kind, d in g["members"][:MAX_PER_GROUP]]
            parts.append(f'<div class="row">{"".join(tiles)}</div>')
    return "".join(parts)


def _band_title(what: str, band: list[float] | None) -> str:
    if not band:
        return f"Borderline {what} pairs (audit sample)"
    low, threshold, high = band
    return f"Borderline {what} pairs: {low:.3f} < cos <= {high:.3f} around the threshold {threshold:.3f} (audit sample)"


def _audit_section(out_dir: Path, cfg: CurateConfig, band: list[float] | None, thumbs: Thumbs) -> str:
    audit = _read_optional(out_dir / "copy_dedup" / "audit.parquet")
    manifest = _read_optional(out_dir / "copy_dedup" / "manifest.parquet")
    if not (_has(audit, "i", "j", "sim") and _has(manifest, *THUMB_COLUMNS)):
        return ""
    parts = [f"<h3>{_e(_band_title('copy-detection', band))}</h3>"]
    head = audit.slice(0, cfg.report.dup_examples)
    for i, j, sim in zip(*(head.column(c).to_pylist() for c in ("i", "j", "sim"))):
        tiles = [_row_tile(thumbs, _row(manifest, int(i)), ""),
                 _row_tile(thumbs, _row(manifest, int(j)), f"cos {sim:.3f}")]
        parts.append(f'<div class="row">{"".join(tiles)}</div>')
    return "".join(parts)


def _decontamination_audit(out_dir: Path, cfg: CurateConfig, band: list[float] | None, thumbs: Thumbs) -> str:
    audit = _read_optional(out_dir / "decontaminate" / "audit.parquet")
    if not _has(audit, "eval_set", "eval_id", "eval_path", "eval_member", "sim", "hit", "id", "path", "member"):
        return ""
    parts = [f"<h3>{_e(_band_title('evaluation-pool', band))}</h3>"]
    for r in audit.slice(0, cfg.report.dup_examples).to_pylist():
        verdict = "removed" if r["hit"] else "kept"
        tiles = [_tile(thumbs.uri(r["eval_path"], r["eval_member"]), f"{r['eval_set']} {r['eval_id']}", "seed"),
                 _tile(thumbs.uri(r["path"], r["member"]), f"cos {r['sim']:.3f} ({verdict}) {r['id']}")]
        parts.append(f'<div class="row">{"".join(tiles)}</div>')
    return "".join(parts)


def _locations(table: pa.Table | None, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """id -> (path, member) for the given ids found in `table`."""
    if not _has(table, "id", "path", "member") or not ids:
        return {}
    t = table.filter(pc.is_in(table.column("id"), pa.array(ids, pa.string())))
    return {i: (p, m) for i, p, m in zip(*(t.column(c).to_pylist() for c in ("id", "path", "member")))}


def _retrieval_section(out_dir: Path, cfg: CurateConfig, thumbs: Thumbs) -> str:
    long = retrieval_table(out_dir / "retrieve")
    selected = _read_optional(out_dir / "retrieve" / "selected.parquet")
    if long is None or not _has(selected, "id", "path", "member"):
        return ""
    parts = []
    for seed_set in sorted(set(long.column("seed_set").unique().to_pylist()) - {BALANCED}):
        sub = long.filter(pc.and_(pc.equal(long.column("seed_set"), seed_set),
                                  pc.is_valid(long.column("seed_id"))))
        per_seed = sub.group_by("seed_id").aggregate([("id", "count")]).to_pylist()
        ranked = sorted(per_seed, key=lambda r: (-r["id_count"], r["seed_id"]))[: cfg.report.retrieval_examples]
        seed_ids = [r["seed_id"] for r in ranked]
        hits_all = sub.filter(pc.is_in(sub.column("seed_id"), pa.array(seed_ids, pa.string()))).to_pylist()
        where = _locations(selected, [h["id"] for h in hits_all] + seed_ids)
        seed_where = {**where, **_locations(_read_optional(out_dir / "embed_ssl" / f"seed-{seed_set}.parquet"),
                                            seed_ids)}
        parts.append(f"<h3>Seed set {_e(seed_set)}</h3>")
        for seed_id in seed_ids:
            hits = sorted((h for h in hits_all if h["seed_id"] == seed_id),
                          key=lambda h: (-(h["similarity"] if h["similarity"] is not None else -2.0), h["id"]))
            tiles = [_tile(thumbs.uri(*seed_where.get(seed_id, (None, None))), f"seed {seed_id}", "seed")]
            for h in hits[:MAX_NEIGHBOURS]:
                label = (f"{h['mode']} cos {h['similarity']:.3f}" if h["similarity"] is not None
                         else f"{h['mode']} cluster {h['cluster']}")
                tiles.append(_tile(thumbs.uri(*where.get(h["id"], (None, None))), f"{label} {h['id']}"))
            more = f"<p>+{len(hits) - MAX_NEIGHBOURS} more</p>" if len(hits) > MAX_NEIGHBOURS else ""
            parts.append(f'<div class="row">{"".join(tiles)}</div>{more}')
    return "".join(parts)


def _plots(out_dir: Path, rep: dict, img_dir: Path) -> dict[str, str]:
    plots = {}
    # The first bar is what ingest listed; then each stage's outputs (images kept, hashed, embedded, selected...).
    funnel = [(s["stage"], s["outputs"]) for s in rep["stages"] if isinstance(s["outputs"], int)]
    if rep["stages"] and rep["stages"][0]["stage"] == "ingest" and isinstance(rep["stages"][0]["inputs"], int):
        funnel.insert(0, ("listed", rep["stages"][0]["inputs"]))
    if funnel:
        def draw_funnel(ax):
            names, values = zip(*funnel)
            ax.barh(range(len(values)), values, color="#4c72b0")
            ax.set_yticks(range(len(values)), names)
            ax.invert_yaxis()
            ax.set_xlabel("images out of each stage")
            for k, v in enumerate(values):
                ax.text(v, k, f" {v}", va="center", fontsize=8)
        plots["funnel"] = _figure(img_dir, "funnel.png", draw_funnel)
    offsets = out_dir / "cluster" / "offsets.npy"
    if "cluster_sizes" in rep and offsets.is_file():
        sizes = np.diff(np.load(offsets))

        def draw_clusters(ax):
            top = int(sizes.max(initial=0))
            if top > 50:  # long tails: log-spaced bins on a log axis (empty clusters are in the table)
                ax.hist(sizes[sizes > 0], bins=np.geomspace(1, top + 1, 40), log=True, color="#55a868")
                ax.set_xscale("log")
            else:
                ax.hist(sizes, bins=max(1, top + 1), range=(0, top + 1), log=True, color="#55a868")
            ax.set_xlabel("cluster size (images)")
            ax.set_ylabel("clusters (log)")
        plots["clusters"] = _figure(img_dir, "cluster_sizes.png", draw_clusters)
    sims: dict[str, np.ndarray] = {}
    long = retrieval_table(out_dir / "retrieve") if "retrieval" in rep else None
    if long is not None:
        long = long.filter(pc.is_valid(long.column("similarity")))
        for name in sorted(set(long.column("seed_set").unique().to_pylist())):
            values = long.filter(pc.equal(long.column("seed_set"), name)).column("similarity").to_numpy()
            # A strided subsample keeps the histogram cheap for huge selections and deterministic.
            sims[name] = values[:: max(1, len(values) // 200_000)]
    if sims:
        def draw_sims(ax):
            for name, values in sorted(sims.items()):
                ax.hist(values, bins=30, alpha=0.6, label=name)
            ax.set_xlabel("cosine similarity to the seed")
            ax.set_ylabel("retrieved images")
            ax.legend(fontsize=8)
        plots["similarity"] = _figure(img_dir, "retrieval_similarity.png", draw_sims)
    return plots


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}.row{display:flex;flex-wrap:wrap;
gap:6px;margin:6px 0;padding:4px;border-bottom:1px solid #ddd}figure{margin:0;width:THUMBpx;font-size:10px;
word-break:break-all}figure.kept,figure.seed{outline:3px solid #2a2}figure.removed{outline:2px solid #c33}
.missing{width:THUMBpx;height:THUMBpx;background:#eee}"""


def render_html(out_dir: Path, rep: dict, cfg: CurateConfig, plots: dict[str, str], thumbs: Thumbs) -> str:
    """The report page; every string from the data is escaped."""
    css = _CSS.replace("THUMB", str(cfg.report.thumb_size))
    body = ["<h1>Curation report</h1>"]
    first = rep["stages"][0] if rep["stages"] else None
    sh = rep.get("shards")
    if first and sh:
        body.append(f"<p><b>{_e(first['inputs'])}</b> images in &rarr; <b>{_e(sh['nsamples'])}</b> written to "
                    f"<b>{_e(sh['nshards'])}</b> shards ({_e(round((sh['total_bytes'] or 0) / 1e6, 1))} MB).</p>")
    body.append("<h2>Stages</h2>")
    body.append(_table(["stage", "inputs", "outputs", "removed / rejected", "seconds"],
                       [[s["stage"], s["inputs"], s["outputs"], _removed(s), s["seconds"]] for s in rep["stages"]]))
    if "funnel" in plots:
        body.append(f'<img src="{_e(plots["funnel"])}" alt="funnel">')
    if rep["rejects"]:
        body.append("<h2>Rejects by reason</h2>")
        body.append(_table(["stage", "reason", "count"],
                           [[s, k, v] for s, reasons in rep["rejects"].items() for k, v in reasons.items()]))
    body.append(_duplicates_html(out_dir, rep, cfg, thumbs))
    if "cluster_sizes" in rep:
        body.append("<h2>Clusters</h2>")
        body.append(_table(list(rep["cluster_sizes"]), [list(rep["cluster_sizes"].values())]))
        if "clusters" in plots:
            body.append(f'<img src="{_e(plots["clusters"])}" alt="cluster sizes">')
    if "retrieval" in rep:
        body.append("<h2>Retrieval</h2>")
        body.append(_table(["seed set", "mode", "reasons", "images"],
                           [[s, m, d["reasons"], d["images"]] for s, modes in rep["retrieval"].items()
                            for m, d in modes.items()]))
        if "similarity" in plots:
            body.append(f'<img src="{_e(plots["similarity"])}" alt="similarities">')
        body.append(_retrieval_section(out_dir, cfg, thumbs))
    if sh:
        body.append("<h2>Shards</h2>")
        body.append(_table(list(sh), [[json.dumps(v) if isinstance(v, dict) else v for v in sh.values()]]))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Curation report</title><style>{css}</style>'
            f'</head><body>{"".join(body)}</body></html>\n')


def _duplicates_html(out_dir: Path, rep: dict, cfg: CurateConfig, thumbs: Thumbs) -> str:
    """Removals by kind and stage, copy groups, giant components, groups to audit, borderline pairs, decontamination."""
    body = ["<h2>Duplicates</h2>"]
    if "dup_kinds" in rep:
        kinds = {k: v for k, v in rep["dup_kinds"].items() if k != "from"}
        body.append(_table(["dup_kind", "removed"], sorted(kinds.items())))
    if "copy_components" in rep:
        body.append("<h3>Copy-detection groups (size: count)</h3>")
        body.append(_table(["size", "groups"], list(rep["copy_components"].items())))
    if "giant_components" in rep:
        body.append("<h3>Giant components (chaining or degenerate content)</h3>")
        body.append(_table(["stage", "limit", "action", "giant components", "sizes (largest piece left)"],
                           [[stage, g["limit"], g["action"], g["count"],
                             ", ".join(f"{c['size']} ({c['largest_piece']})" for c in g["largest"]) or "-"]
                            for stage, g in rep["giant_components"].items()]))
    groups = rep.get("audit_groups", {})
    if "near_dedup" in groups:
        body.append(_groups_section(out_dir, "near_dedup", groups["near_dedup"],
                                    "Exact and perceptual-hash duplicate groups (kept first)", thumbs))
    if "copy_dedup" in groups:
        body.append(_groups_section(out_dir, "copy_dedup", groups["copy_dedup"], "Copy-detection groups (kept first)",
                                    thumbs))
    bands = rep.get("audit_bands", {})
    body.append(_audit_section(out_dir, cfg, bands.get("copy_dedup"), thumbs))
    if "decontamination" in rep:
        body.append("<h2>Decontamination</h2>")
        body.append(_table(["evaluation set", "pool images removed here", "already removed by an earlier stage"],
                           [[k, v["removed_here"], v["already_removed"]] for k, v in rep["decontamination"].items()]))
        body.append(_decontamination_audit(out_dir, cfg, bands.get("decontaminate"), thumbs))
    return "".join(body)


def _removed(stage: dict) -> str:
    """'kind n, ...; reason n, ...' of what the stage itself removed and rejected."""
    parts = [", ".join(f"{k} {v}" for k, v in stage[key].items()) for key in ("removed", "rejects") if stage[key]]
    return "; ".join(parts)


def finish_report(ctx: StageContext, table: pa.Table) -> dict:
    """Write img/*.png, report.json and report.html; counts: inputs (stages read), outputs (plots), thumbnails."""
    out_dir, stage_dir = ctx.output_dir, ctx.stage_dir("report")
    rep = collect(out_dir, ctx.cfg.report.dup_examples)
    plots = _plots(out_dir, rep, stage_dir / "img")
    thumbs = Thumbs(ctx.cfg)
    try:
        page = render_html(out_dir, rep, ctx.cfg, plots, thumbs)
    finally:
        thumbs.close()
    artifacts.write_json_atomic(stage_dir / "report.json", rep)
    artifacts.write_bytes_atomic(stage_dir / "report.html", page.encode())
    return {"inputs": table.num_rows, "outputs": len(plots), "thumbnails": thumbs.made}


STAGE = Stage(
    name="report",
    inputs=("shards",),
    outputs=("report.json", "report.html"),
    config_sections=("report", "decode"),
    plan=plan_report,
    finish=finish_report,
)
