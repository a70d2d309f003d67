"""kNN search (flat / IVF / IVF-PQ + exact re-rank), copy-detection dedup and eval-set decontamination.

Upstream artifacts are synthetic: a near_dedup manifest and embed_copy vectors with planted structure, committed with
`artifacts.commit_stage` so the stages' `ctx.require` passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.core import artifacts, knn
from data_pipeline.core.config import load_config
from data_pipeline.core.knn import (
    KnnParams,
    Searcher,
    exact_scores,
    exact_search,
    knn_params,
    knn_search,
    knn_self,
    measure_recalls,
    searcher_from_bytes,
)
from data_pipeline.core.stage import StageContext, run_stage
from data_pipeline.dedup.copy_dedup import STAGE as COPY_STAGE
from data_pipeline.dedup.copy_dedup import self_pairs, shared_index_file
from data_pipeline.dedup.decontaminate import STAGE as DECON_STAGE

D = 128  # random unit vectors in 128-d have |cos| < ~0.4, so only planted pairs cross 0.45


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pair_at(rng: np.random.Generator, cos: float, n: int = 2) -> np.ndarray:
    """n unit vectors in a random plane, consecutive ones at cosine `cos` (a chain for n > 2)."""
    basis = np.linalg.qr(rng.standard_normal((D, 2)))[0].T  # [2, D] orthonormal
    theta = np.arccos(cos)
    return np.stack([np.cos(t * theta) * basis[0] + np.sin(t * theta) * basis[1] for t in range(n)])


def _clustered(n_clusters: int, per: int, seed: int) -> np.ndarray:
    """float16 [n_clusters * per, D]: tight clusters (member-member cos ~0.8) in random order."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, D)))
    x = np.repeat(centres, per, axis=0) + 0.043 * rng.standard_normal((n_clusters * per, D))
    return _unit(x[rng.permutation(len(x))]).astype(np.float16)


def _brute(base: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ base.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


# --------------------------------------------------------------------------------------------------- kNN


def test_flat_search_is_exact_and_sorted():
    base = _clustered(40, 5, seed=1)
    q = base[:30]
    sims, idx = knn_search(base, q, 10, KnnParams(index="flat", threads=1))
    ref_s, ref_i = _brute(base, q, 10)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and sims.shape == (30, 10)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert (np.sort(idx, 1) == np.sort(ref_i, 1)).all()
    assert (np.diff(sims, axis=1) <= 0).all()
    # k beyond the base size pads with -1 / -inf.
    s, i = knn_search(base[:3], q[:2], 5, KnnParams(index="flat", threads=1))
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (i[:, :3] >= 0).all()


def test_self_search_drops_self_even_with_exact_duplicates():
    base = _clustered(20, 4, seed=2)
    base[7] = base[3]  # an exact duplicate ties with self at cos 1
    sims, idx = knn_self(base, 5, KnnParams(index="flat", threads=1))
    assert (idx != np.arange(len(base))[:, None]).all()
    assert idx[3, 0] == 7 and idx[7, 0] == 3
    assert sims.shape == (len(base), 5)


@pytest.mark.parametrize("kind,n_clusters", [("ivf", 300), ("ivfsq8", 300), ("ivfpq", 150)])  # PQ training: smaller
def test_approximate_index_reranked_matches_flat_graph(kind, n_clusters):
    base = _clustered(n_clusters, 5, seed=3)
    params = KnnParams(index=kind, threads=2, nprobe=16, pq_m=8)
    searcher = Searcher(base, params)
    assert searcher.kind == kind and searcher.nlist > 1
    # Clusters of 5: the 4 mates are the neighbours that matter; the rest of a top-16 list is far noise.
    [recall] = measure_recalls(base, 4, params, sample=300, seed=0, searcher=searcher)
    [edge_recall] = measure_recalls(base, 16, params, sample=300, seed=0, searcher=searcher, min_sims=(0.6,))
    print(f"{kind}: nlist={searcher.nlist} nprobe=16 recall@4={recall:.4f} edge recall@16={edge_recall:.4f}")
    assert recall >= 0.95 and edge_recall >= 0.95
    sims, idx = searcher.search(base[:50], 8)
    # Re-ranked similarities are the exact float32 dot products of the stored vectors.
    exact = np.einsum("bkd,bd->bk", base[idx].astype(np.float32), base[:50].astype(np.float32))
    np.testing.assert_allclose(sims, exact, atol=1e-6)
    flat = Searcher(base, KnnParams(index="flat", threads=2))
    edges = {}
    for name, s in (("approx", searcher), ("flat", flat)):
        si, ii = s.search_self(0, len(base), 8)
        q = np.repeat(np.arange(len(base)), 8)
        keep = si.ravel() > 0.6
        edges[name] = set(zip(np.minimum(q, ii.ravel())[keep].tolist(), np.maximum(q, ii.ravel())[keep].tolist()))
    assert edges["approx"] == edges["flat"] and len(edges["flat"]) > 100 * n_clusters // 30


def test_ivfpq_uses_fast_scan_codes_on_cpu_and_answers_queries_independently_of_batching():
    import faiss
    import torch

    base = _clustered(150, 5, seed=3)
    fast = Searcher(base, KnnParams(index="ivfpq", threads=2, nprobe=16, pq_m=8))
    eight_bit = Searcher(base, KnnParams(index="ivfpq", threads=2, nprobe=16, pq_m=8, pq_fast_scan=False))
    assert isinstance(faiss.downcast_index(fast.index), faiss.IndexIVFPQFastScan)
    assert type(faiss.downcast_index(eight_bit.index)) is faiss.IndexIVFPQ
    assert faiss.downcast_index(fast.index).pq.M == 16 and faiss.downcast_index(eight_bit.index).pq.M == 8
    assert fast.nbytes == eight_bit.nbytes  # the same code bytes per vector
    threads = torch.get_num_threads()
    whole = fast.search(base[:60], 8)
    sliced = [fast.search(base[i : min(i + 7, 60)], 8) for i in range(0, 60, 7)]  # what array tasks do
    assert np.array_equal(whole[1], np.vstack([x[1] for x in sliced]))
    assert np.array_equal(whole[0], np.vstack([x[0] for x in sliced]))
    assert torch.get_num_threads() == threads  # the re-rank's torch threads are restored
    # Too few training points for 16 centroids per sub-quantizer: the 8-bit form with a smaller codebook.
    small = Searcher(base[:500], KnnParams(index="ivfpq", threads=1, nlist=4, pq_m=8))
    assert type(faiss.downcast_index(small.index)) is faiss.IndexIVFPQ


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_exact_scores_match_float64_and_are_symmetric_across_steps(dtype, monkeypatch):
    rng = np.random.default_rng(9)
    base = _unit(rng.standard_normal((300, D))).astype(dtype)
    queries = base[:40].astype(np.float32)
    cand = rng.integers(0, 300, size=(40, 25))
    cand[7] = cand[6]  # duplicate candidates across queries
    cand[:, 0] = np.arange(40)[::-1]  # query i holds 39 - i: both endpoints of those pairs are scored
    cand[3, 5:9] = -1
    monkeypatch.setattr(knn, "RERANK_BYTES", 3 * 25 * D * 4)  # 3 queries per step: buffers reused, last one short
    got = exact_scores(base, queries, cand, threads=2)
    ref = np.einsum("brd,bd->br", base[np.where(cand >= 0, cand, 0)].astype(np.float64), queries.astype(np.float64))
    assert np.isneginf(got[3, 5:9]).all() and np.isfinite(np.delete(got, np.s_[5:9], axis=1)).all()
    ok = cand >= 0
    np.testing.assert_allclose(got[ok], ref[ok], rtol=0, atol=1e-6)
    # The same pair gives the same bits from either endpoint, whatever step each was scored in.
    assert all(got[i, 0] == got[39 - i, 0] for i in range(40))
    monkeypatch.setattr(knn, "RERANK_BYTES", 64 << 20)
    assert np.array_equal(exact_scores(base, queries, cand, threads=1), got)


def test_exact_search_blocks_agree_with_single_index():
    base = _clustered(50, 4, seed=4)
    a = exact_search(base, base[:20], 7, KnnParams(base_block=37, query_block=6, threads=1))
    b = exact_search(base, base[:20], 7, KnnParams(threads=1))
    assert (a[1] == b[1]).all() and (a[0] == b[0]).all()


def test_pq_m_must_divide_dimension():
    with pytest.raises(ValueError, match="pq_m"):
        Searcher(_clustered(100, 5, seed=5), KnnParams(index="ivfpq", pq_m=7))


def test_self_pairs_resume_reuses_work_files(tmp_path):
    base = _clustered(200, 4, seed=6)
    params = KnnParams(index="ivf", threads=2)
    a, b, s, searcher = self_pairs(base, 16, 0.5, params, tmp_path)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files][0] == "index.faiss" and len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    a2, b2, s2, _ = self_pairs(base, 16, 0.5, params, tmp_path)  # a resumed run reads the checkpoints
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert (a == a2).all() and (b == b2).all() and (s == s2).all() and (a < b).all() and len(a) > 400


# ------------------------------------------------------------------------------------------ the stages


def _scenario(seed: int = 0) -> dict:
    """Rows (manifest order) with planted structure; vec None = not in the embedded pool.

    Groups: A (4 copies; two tie on the largest pixels, the first listed must win), B (3 copies), a chain
    a~b~c with cos(a, c) ~ 0 and b the smallest, an audit pair at 0.57 (no edge) and one at 0.63 (edge), 40 distinct
    images, a rejected row and an exact duplicate of an A member (both outside the pool).
    """
    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    def add(name: str, vec, w=100, h=100, **kw):
        rows.append({"name": name, "vec": vec, "w": w, "h": h, **kw})
        return len(rows) - 1

    base_a = _unit(rng.standard_normal(D))
    for k, (w, h, rid) in enumerate([(100, 100, "a0"), (200, 100, "zz"), (200, 100, "aa"), (50, 50, "00")]):
        add(f"A{k}", _unit(base_a + 0.043 * rng.standard_normal(D)), w, h, id=f"idA-{rid}")
    base_b = _unit(rng.standard_normal(D))
    for k in range(3):
        add(f"B{k}", _unit(base_b + 0.043 * rng.standard_normal(D)), 64 + k, 64, id=f"idB-{k}")
    for k, v in enumerate(_pair_at(rng, 0.7, 3)):
        add(f"C{k}", v, 90 if k == 1 else 100, 90 if k == 1 else 100, id=f"idC-{k}")
    for k, v in enumerate(_pair_at(rng, 0.57)):
        add(f"L{k}", v, id=f"idL-{k}")
    for k, v in enumerate(_pair_at(rng, 0.63)):
        add(f"H{k}", v, id=f"idH-{k}")
    for k in range(40):
        add(f"R{k}", _unit(rng.standard_normal(D)), id=f"idR-{k:02d}")
    add("rejected", None, status="rejected", reason="too_small", id="idX-rej")
    add("dupA1", None, dup_of="A1", id="idX-dup")
    order = rng.permutation(len(rows))  # manifest order unrelated to construction order
    rows = [rows[i] for i in order]
    pos = {r["name"]: i for i, r in enumerate(rows)}
    vecs = np.stack([r["vec"] for r in rows if r["vec"] is not None])
    sims = vecs @ vecs.T
    names = [r["name"] for r in rows if r["vec"] is not None]
    planted = {frozenset(p) for p in [("C0", "C1"), ("C1", "C2"), ("L0", "L1"), ("H0", "H1")]}
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            same = names[i][0] == names[j][0] and names[i][0] in "AB"
            if not same and frozenset((names[i], names[j])) not in planted:
                assert sims[i, j] < 0.45, (names[i], names[j])  # the fixture itself has no accidental matches
    return {"rows": rows, "pos": pos, "rng": rng}


def _write_upstream(out: Path, sc: dict, evals: dict[str, np.ndarray] | None = None) -> None:
    rows, pos = sc["rows"], sc["pos"]
    n = len(rows)
    group = [pos[r["dup_of"]] if r.get("dup_of") else i for i, r in enumerate(rows)]
    manifest = pa.table({
        "id": [r["id"] for r in rows],
        "source": ["src"] * n,
        "path": [f"/data/{r['name']}.jpg" for r in rows],
        "member": [None] * n,
        "nbytes": pa.array([1000] * n, pa.int64()),
        "sha256": [f"{i:064x}" for i in range(n)],
        "status": [r.get("status", "ok") for r in rows],
        "reject_reason": [r.get("reason", "") for r in rows],
        "width": pa.array([r["w"] for r in rows], pa.int64()),
        "height": pa.array([r["h"] for r in rows], pa.int64()),
        "dup_group": pa.array(group, pa.int64()),
        "dup_of": [rows[g]["id"] if g != i else "" for i, g in enumerate(group)],
        "dup_kind": ["exact_bytes" if r.get("dup_of") else "" for r in rows],
        "keep": [r["vec"] is not None for r in rows],
    })
    nd = out / "near_dedup"
    artifacts.write_parquet_atomic(nd / "manifest.parquet", manifest)
    artifacts.commit_stage(nd, "near-fp", ["manifest.parquet"], {})
    ec = out / "embed_copy"
    pool_rows = [i for i, r in enumerate(rows) if r["vec"] is not None]
    artifacts.write_npy_atomic(ec / "pool.npy", np.stack([rows[i]["vec"] for i in pool_rows]).astype(np.float16))
    artifacts.write_parquet_atomic(ec / "pool_rows.parquet", pa.table({
        "row_id": pa.array(pool_rows, pa.int64()), "id": [rows[i]["id"] for i in pool_rows]}))
    outputs = ["pool.npy", "pool_rows.parquet"]
    for name, vecs in (evals or {}).items():
        m = len(vecs)
        artifacts.write_npy_atomic(ec / f"eval-{name}.npy", vecs.astype(np.float16))
        artifacts.write_parquet_atomic(ec / f"eval-{name}.parquet", pa.table({
            "id": [f"{name}-{k}" for k in range(m)], "source": [name] * m, "path": [f"/eval/{k}.jpg" for k in range(m)],
            "member": pa.array([None] * m, pa.string()), "width": pa.array([64] * m, pa.int64()),
            "height": pa.array([64] * m, pa.int64())}))
        outputs += [f"eval-{name}.npy", f"eval-{name}.parquet"]
    artifacts.commit_stage(ec, "embed-fp-" + "-".join(sorted(evals or {})), outputs, {})


def _run(out: Path, *stages, overrides=()):
    cfg = load_config(None, ["copy_dedup.threads=2", *overrides])
    ctx = StageContext(cfg, out)
    return [run_stage(s, ctx) for s in stages]


def _by_name(sc: dict, table: pa.Table) -> dict[str, dict]:
    recs = table.to_pylist()
    return {r["name"]: recs[i] for i, r in enumerate(sc["rows"])}


def test_copy_dedup_planted_components_and_representatives(tmp_path, capsys):
    sc = _scenario()
    _write_upstream(tmp_path, sc)
    (res,) = _run(tmp_path, COPY_STAGE)
    assert "recall@" in capsys.readouterr().out
    d = tmp_path / "copy_dedup"
    m = _by_name(sc, artifacts.read_table(d / "manifest.parquet"))
    pos = sc["pos"]
    # A: largest pixels tie between A1 and A2 -> the first listed wins (never the id: ids hash the source path).
    # B: widest (B2). The chain C0~C1~C2 (cos(C0, C2) ~ 0, C1 the smallest): C0 and C2 are both kept, neither removed
    # in favour of the other; C1 goes to the closer of the two (both at cos ~0.7; float16 rounding decides; ties: the
    # first listed). H0/H1 tie on size: the first listed is kept.
    vec = {r["name"]: r["vec"].astype(np.float16).astype(np.float32) for r in sc["rows"] if r["vec"] is not None}
    c1_rep = max(("C0", "C2"), key=lambda c: (float(vec["C1"] @ vec[c]), -pos[c]))
    a_rep, h_rep = min(("A1", "A2"), key=pos.__getitem__), min(("H0", "H1"), key=pos.__getitem__)
    expected_rep = {**{f"A{k}": a_rep for k in range(4)}, **{f"B{k}": "B2" for k in range(3)},
                    "C0": "C0", "C1": c1_rep, "C2": "C2", "H0": h_rep, "H1": h_rep}
    for name, rec in m.items():
        if name in ("rejected", "dupA1"):
            assert rec["copy_component"] == -1 and not rec["keep"]
            continue
        rep = expected_rep.get(name, name)
        assert rec["copy_component"] == pos[rep], name
        assert rec["keep"] == (rep == name), name
        if rep != name:
            assert rec["dup_kind"] == "copy" and rec["dup_group"] == pos[rep] and rec["dup_of"] == m[rep]["id"]
        else:
            assert rec["dup_kind"] == "" and rec["dup_group"] == pos[name]
    # The exact duplicate of A1 follows A1 to the group's kept member; it keeps its own dup_kind and its dup_of (the
    # image it was removed in favour of).
    assert m["dupA1"]["dup_group"] == pos[a_rep] and m["dupA1"]["dup_of"] == "idA-zz"
    assert m["dupA1"]["dup_kind"] == "exact_bytes"
    assert m["L0"]["keep"] and m["L1"]["keep"]  # 0.57 is below the edge threshold
    # The chain: C0~C1, C1~C2 are edges, C0~C2 is not; all three are one component of the graph, not one group.
    edges = artifacts.read_table(d / "edges.parquet")
    pairs = {(i, j) for i, j in zip(edges.column("i").to_pylist(), edges.column("j").to_pylist())}
    c = sorted([pos["C0"], pos["C2"]])
    assert tuple(c) not in pairs and len(pairs) == 6 + 3 + 2 + 1
    assert (edges.column("sim").to_numpy() > 0.6).all()
    assert all(i < j for i, j in pairs)
    audit = artifacts.read_table(d / "audit.parquet")
    sims = audit.column("sim").to_numpy()
    assert audit.num_rows >= 2 and ((sims > 0.55) & (sims <= 0.65)).all()
    got = set(zip(audit.column("id_i").to_pylist(), audit.column("id_j").to_pylist()))
    assert {tuple(sorted(["idL-0", "idL-1"])), tuple(sorted(["idH-0", "idH-1"]))} <= {tuple(sorted(p)) for p in got}
    assert set(audit.column("path_i").to_pylist()) <= {f"/data/{r['name']}.jpg" for r in sc["rows"]}
    comps = json.loads((d / "components.json").read_text())
    assert comps["histogram"] == {"1": 42, "2": 1, "3": 2, "4": 1} and comps["largest"][:3] == [4, 3, 3]
    assert comps["groups"]["histogram"] == {"1": 43, "2": 2, "3": 1, "4": 1}
    assert comps["giant"]["count"] == 0 and comps["giant"]["limit"] == 32
    counts = res.counts
    assert counts["removed"] == {"copy": 3 + 2 + 1 + 1} and counts["recall"] == 1.0 and counts["index"] == "flat"
    assert counts["inputs"] == 54 and counts["outputs"] == 54 - 7 and counts["edges"] == 12


def test_copy_dedup_ivf_path_same_manifest(tmp_path, capsys):
    sc = _scenario()
    for sub, overrides in (("flat", ["copy_dedup.index=flat"]),
                           ("ivf", ["copy_dedup.index=ivf", "copy_dedup.nlist=6", "copy_dedup.nprobe=3",
                                    "copy_dedup.recall_sample=54"])):
        _write_upstream(tmp_path / sub, sc)
        (res,) = _run(tmp_path / sub, COPY_STAGE, overrides=overrides)
    assert res.counts["index"] == "ivf" and res.counts["recall"] >= 0.95
    assert res.counts["recall_method"] == "sampled:54" and res.counts["nlist"] == 6
    print(capsys.readouterr().out)
    for name in ("manifest.parquet", "edges.parquet"):
        assert (tmp_path / "flat/copy_dedup" / name).read_bytes() == (tmp_path / "ivf/copy_dedup" / name).read_bytes()


def test_decontaminate_measures_recall_of_the_approximate_index(tmp_path, capsys):
    sc = _scenario()
    rng = np.random.default_rng(11)
    pool = np.stack([r["vec"] for r in sc["rows"] if r["vec"] is not None])
    # 30 eval images near pool images (cos 0.5-0.9): every one has an exact neighbour above the 0.45 threshold.
    near = zip(rng.choice(len(pool), 30), rng.uniform(0.5, 0.9, 30))
    evals = np.stack([_eval_near(pool[i], c, rng) for i, c in near])
    _write_upstream(tmp_path, sc, {"evalS": evals})
    # A deliberately coarse index (IVF-PQ, 1 of 8 lists probed, no extra candidates) so that recall is below 1.
    over = ["copy_dedup.index=ivfpq", "copy_dedup.nlist=8", "copy_dedup.nprobe=1", "copy_dedup.pq_m=8",
            "copy_dedup.rerank=1", "copy_dedup.recall_sample=30", "decontaminate.k=4", "decontaminate.nprobe=1",
            "decontaminate.eval_sets=[evalS]"]
    _, res = _run(tmp_path, COPY_STAGE, DECON_STAGE, overrides=over)
    got = res.counts["sets"]["evalS"]
    assert got["index"] == "ivfpq" and got["recall_method"] == "sampled:30"
    # Independent measurement: exact neighbours by float64 brute force, approximate ones from the same seeded index.
    cfg = load_config(None, ["copy_dedup.threads=2", *over])
    params = knn_params(cfg.copy_dedup, seed=0, nprobe=cfg.decontaminate.nprobe)
    searcher = Searcher(np.load(tmp_path / "embed_copy/pool.npy", mmap_mode="r"), params)
    ev = evals.astype(np.float16)
    approx = searcher.search(ev, 4)[1]
    exact_s, exact = _brute(pool.astype(np.float16), ev, 4)
    hits = [np.isin(e, a).sum() for a, e in zip(approx, exact)]
    hits_edge = [np.isin(e[s > 0.45], a).sum() for a, e, s in zip(approx, exact, exact_s)]
    assert got["recall_at_k"] == pytest.approx(sum(hits) / exact.size, abs=1e-6)
    assert got["recall"] == pytest.approx(sum(hits_edge) / (exact_s > 0.45).sum(), abs=1e-6)
    assert got["recall_at_k"] < 1.0  # the coarse index does miss neighbours: the figure is a measurement
    assert f"recall@k {got['recall_at_k']:.4f} (sampled:30)" in capsys.readouterr().out


def _eval_near(vec: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    other = rng.standard_normal(D)
    other = _unit(other - (other @ vec) * vec)
    return np.cos(np.arccos(cos)) * vec + np.sin(np.arccos(cos)) * other


def test_decontaminate_removes_whole_touched_component(tmp_path, capsys):
    sc = _scenario()
    rows, pos, rng = sc["rows"], sc["pos"], sc["rng"]
    vec = {r["name"]: r["vec"] for r in rows}
    # evalA touches A3 (a member copy_dedup already removed) at cos 0.55; evalR touches R5 (cos 0.48) and nothing
    # near A; evalN matches nothing.
    evals = {
        "evalA": np.stack([_eval_near(vec["A3"], 0.55, rng), _unit(rng.standard_normal(D))]),
        "evalR": _eval_near(vec["R5"], 0.48, rng)[None],
        "evalN": _unit(rng.standard_normal((2, D))),
    }
    _write_upstream(tmp_path, sc, evals)
    overrides = ["decontaminate.eval_sets=[evalA, /some/where/evalR, evalN=/x/y]"]
    res_copy, res = _run(tmp_path, COPY_STAGE, DECON_STAGE, overrides=overrides)
    before = _by_name(sc, artifacts.read_table(tmp_path / "copy_dedup/manifest.parquet"))
    after = _by_name(sc, artifacts.read_table(tmp_path / "decontaminate/manifest.parquet"))
    hit = {"A0", "A1", "A2", "A3", "dupA1", "R5"}
    for name in after:
        b, a = before[name], after[name]
        if name in hit:
            assert not a["keep"] and a["contaminated_by"] == ("evalR" if name == "R5" else "evalA"), name
            assert a["dup_kind"] == (b["dup_kind"] if not b["keep"] else "contaminated"), name
        else:
            assert a == {**b, "contaminated_by": None}, name
    a_kept, a_copy = sorted(("A1", "A2"), key=pos.__getitem__)  # the size tie goes to the first listed
    assert after[a_kept]["dup_kind"] == "contaminated" and after[a_copy]["dup_kind"] == "copy"
    matches = artifacts.read_table(tmp_path / "decontaminate/matches.parquet")
    assert set(matches.column("eval_set").to_pylist()) == {"evalA", "evalR"}
    assert (matches.column("sim").to_numpy() > 0.45).all()
    assert pos["A3"] in matches.column("row_id").to_pylist()
    sets = res.counts["sets"]
    # evalA's component had 5 rows: its kept member removed here; A0, the other of A1/A2, A3 (copies) and dupA1
    # were already removed upstream.
    assert sets["evalA"] == {"eval_images": 2, "matches": sets["evalA"]["matches"], "matched_components": 1,
                             "removed_rows": 1, "already_removed": 4, "index": "flat",
                             "index_bytes": sets["evalA"]["index_bytes"], "recall": 1.0, "recall_at_k": 1.0,
                             "recall_method": "exact"}
    assert sets["evalR"]["removed_rows"] == 1 and sets["evalN"]["matched_components"] == 0
    assert res.counts["removed"] == {"contaminated": 2}
    assert res.counts["outputs"] == res_copy.counts["outputs"] - 2
    # The audit band follows the configured threshold: 0.45 +- 0.05. evalR~R5 at 0.48 is in it (a hit).
    audit = artifacts.read_table(tmp_path / "decontaminate/audit.parquet").to_pylist()
    assert audit and all(0.40 < a["sim"] <= 0.50 + 1e-6 and a["hit"] == (a["sim"] > 0.45) for a in audit)
    r5 = [a for a in audit if a["row_id"] == pos["R5"]]
    assert len(r5) == 1 and r5[0]["eval_set"] == "evalR" and r5[0]["hit"] and r5[0]["path"] == "/data/R5.jpg"
    assert r5[0]["eval_path"] == "/eval/0.jpg"


def test_decontaminate_without_eval_sets_is_a_noop(tmp_path):
    sc = _scenario()
    _write_upstream(tmp_path, sc)
    _, res = _run(tmp_path, COPY_STAGE, DECON_STAGE)
    before = artifacts.read_table(tmp_path / "copy_dedup/manifest.parquet")
    after = artifacts.read_table(tmp_path / "decontaminate/manifest.parquet")
    assert after.drop_columns(["contaminated_by"]).equals(before)
    assert after.column("contaminated_by").null_count == after.num_rows
    assert artifacts.read_table(tmp_path / "decontaminate/matches.parquet").num_rows == 0
    assert res.counts["removed"] == {"contaminated": 0} and res.counts["sets"] == {}


def test_missing_eval_embeddings_is_a_clear_error(tmp_path):
    sc = _scenario()
    _write_upstream(tmp_path, sc)
    with pytest.raises(ValueError, match="eval-imagenet.npy"):
        _run(tmp_path, COPY_STAGE, DECON_STAGE, overrides=["decontaminate.eval_sets=[imagenet=/x]"])


def test_rerun_is_a_noop_and_outputs_are_deterministic(tmp_path):
    sc = _scenario()
    evals = {"evalA": _eval_near(sc["rows"][sc["pos"]["B1"]]["vec"], 0.6, sc["rng"])[None]}
    ov = ["decontaminate.eval_sets=[evalA]", "copy_dedup.index=ivf", "copy_dedup.recall_sample=20"]
    for sub in ("one", "two"):
        _write_upstream(tmp_path / sub, sc, evals)
        first = _run(tmp_path / sub, COPY_STAGE, DECON_STAGE, overrides=ov)
        assert not any(r.skipped for r in first)
    markers = {s: (tmp_path / "one" / s / "_SUCCESS.json").read_bytes() for s in ("copy_dedup", "decontaminate")}
    again = _run(tmp_path / "one", COPY_STAGE, DECON_STAGE, overrides=ov)
    assert all(r.skipped for r in again)
    for s, marker in markers.items():
        assert (tmp_path / "one" / s / "_SUCCESS.json").read_bytes() == marker
        assert (tmp_path / "two" / s / "_SUCCESS.json").read_bytes() == marker  # byte-identical second run
        assert not (tmp_path / "one" / s / "_work").exists()
    # New embeddings with an unchanged manifest must re-run the stage (upstream commit is in the fingerprint).
    _write_upstream(tmp_path / "one", sc, {"evalA": _unit(sc["rng"].standard_normal((1, D)))})
    third = _run(tmp_path / "one", COPY_STAGE, DECON_STAGE, overrides=ov)
    assert not third[0].skipped and third[1].counts["removed"] == {"contaminated": 0}


def _count_ivf_training(monkeypatch) -> list[int]:
    """Patch `Searcher._train_ivf` to count its calls; returns the list that grows by one per training."""
    calls: list[int] = []
    train = Searcher._train_ivf

    def counted(self, base):
        calls.append(base.shape[0])
        return train(self, base)

    monkeypatch.setattr(Searcher, "_train_ivf", counted)
    return calls


def test_decontaminate_loads_copy_dedup_index_and_writes_the_same_bytes_as_retraining(tmp_path, monkeypatch):
    sc = _scenario()
    evals = {"evalA": np.stack([_eval_near(sc["rows"][sc["pos"][n]]["vec"], c, sc["rng"])
                                for n, c in (("B1", 0.6), ("C0", 0.5), ("R3", 0.44))])}
    ov = ["decontaminate.eval_sets=[evalA]", "copy_dedup.index=ivf", "copy_dedup.nlist=4", "copy_dedup.nprobe=2",
          "copy_dedup.recall_sample=20"]
    trained = _count_ivf_training(monkeypatch)
    _write_upstream(tmp_path / "reuse", sc, evals)
    _run(tmp_path / "reuse", COPY_STAGE, DECON_STAGE, overrides=ov)
    assert len(trained) == 1  # copy_dedup trained the index, decontaminate loaded it
    cfg = load_config(None, ["copy_dedup.threads=2", *ov])

    def kept_file(out: Path) -> Path:
        pool = np.load(out / "embed_copy/pool.npy", mmap_mode="r")
        return shared_index_file(StageContext(cfg, out), pool, knn_params(cfg.copy_dedup, seed=0))

    kept = kept_file(tmp_path / "reuse")
    assert sorted((tmp_path / "reuse/copy_dedup").glob("index-*.faiss")) == [kept]

    _write_upstream(tmp_path / "retrain", sc, evals)
    _run(tmp_path / "retrain", COPY_STAGE, overrides=ov)
    (tmp_path / "retrain/copy_dedup" / kept.name).unlink()  # as main did: the index left with copy_dedup's _work
    _run(tmp_path / "retrain", DECON_STAGE, overrides=ov)
    assert len(trained) == 3
    for name in ("manifest.parquet", "matches.parquet", "audit.parquet", "_SUCCESS.json"):
        got = (tmp_path / "reuse/decontaminate" / name).read_bytes()
        assert got == (tmp_path / "retrain/decontaminate" / name).read_bytes(), name
    matches = artifacts.read_table(tmp_path / "reuse/decontaminate/matches.parquet")
    assert matches.num_rows >= 2  # the planted eval images do match: the comparison covers real removals

    # A new embed_copy commit gives another file name: the kept index is not loaded for it, decontaminate retrains.
    _write_upstream(tmp_path / "reuse", sc, {**evals, "evalB": evals["evalA"][:1]})
    assert kept.is_file() and not kept_file(tmp_path / "reuse").is_file()
    (res,) = _run(tmp_path / "reuse", DECON_STAGE, overrides=ov)
    assert not res.skipped and len(trained) == 4


def test_decontaminate_probes_its_own_lists_of_copy_dedups_index(tmp_path, monkeypatch):
    """decontaminate.nprobe sets the probes of the eval search only: the index is copy_dedup's (trained once, the
    same file), copy_dedup's self-search keeps copy_dedup.nprobe."""
    from data_pipeline.dedup.decontaminate import pool_index

    sc = _scenario()
    evals = {"evalA": np.stack([_eval_near(sc["rows"][sc["pos"]["B1"]]["vec"], 0.6, sc["rng"])])}
    ov = ["decontaminate.eval_sets=[evalA]", "copy_dedup.index=ivf", "copy_dedup.nlist=4", "copy_dedup.nprobe=1",
          "decontaminate.nprobe=3"]
    trained = _count_ivf_training(monkeypatch)
    _write_upstream(tmp_path, sc, evals)
    _run(tmp_path, COPY_STAGE, DECON_STAGE, overrides=ov)
    assert len(trained) == 1
    cfg = load_config(None, ["copy_dedup.threads=2", *ov])
    ctx = StageContext(cfg, tmp_path)
    pool = np.load(tmp_path / "embed_copy/pool.npy", mmap_mode="r")
    shared = pool_index(ctx, pool, tmp_path / "unused")
    assert shared.index_file == str(shared_index_file(ctx, pool, knn_params(cfg.copy_dedup, seed=0)))
    assert shared.searcher().index.nprobe == 3 and len(trained) == 1
    copy_searcher = searcher_from_bytes(pool, knn_params(cfg.copy_dedup, seed=0), Path(shared.index_file).read_bytes())
    assert copy_searcher.index.nprobe == 1
    with pytest.raises(ValueError, match="decontaminate.nprobe"):
        load_config(None, ["decontaminate.nprobe=0"])


def test_pool_not_matching_manifest_is_rejected(tmp_path):
    sc = _scenario()
    _write_upstream(tmp_path, sc)
    ec = tmp_path / "embed_copy"
    rows = artifacts.read_table(ec / "pool_rows.parquet")
    ids = rows.column("id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    artifacts.write_parquet_atomic(ec / "pool_rows.parquet", rows.set_column(1, "id", pa.array(ids)))
    artifacts.commit_stage(ec, "embed-fp-bad", ["pool.npy", "pool_rows.parquet"], {})
    with pytest.raises(ValueError, match="does not match"):
        _run(tmp_path, COPY_STAGE)


def test_single_image_pool(tmp_path):
    rng = np.random.default_rng(9)
    rows = [{"name": "only", "vec": _unit(rng.standard_normal(D)), "w": 64, "h": 64, "id": "id-only"},
            {"name": "rej", "vec": None, "w": 0, "h": 0, "id": "id-rej", "status": "rejected", "reason": "too_small"}]
    sc = {"rows": rows, "pos": {"only": 0, "rej": 1}}
    _write_upstream(tmp_path, sc, {"ev": rows[0]["vec"][None]})
    res_copy, res = _run(tmp_path, COPY_STAGE, DECON_STAGE, overrides=["decontaminate.eval_sets=[ev]"])
    assert res_copy.counts["removed"] == {"copy": 0} and res_copy.counts["edges"] == 0
    m = artifacts.read_table(tmp_path / "decontaminate/manifest.parquet").to_pylist()
    assert m[0]["copy_component"] == 0 and not m[0]["keep"] and m[0]["contaminated_by"] == "ev"
    assert m[1]["contaminated_by"] is None and res.counts["removed"] == {"contaminated": 1}
