"""Spherical / hierarchical k-means, the cluster stage (determinism, kill-and-resume) and the retrieve stage, on
synthetic embedding artifacts committed with `artifacts.commit_stage`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data_pipeline.cluster import cluster, retrieve
from data_pipeline.cluster.kmeans import (
    Checkpointer,
    assign,
    balanced_sample,
    hierarchical_kmeans,
    set_threads,
    spherical_kmeans,
    water_fill,
)
from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, KMeansConfig, RetrieveConfig, SeedSetConfig, load_config
from data_pipeline.core.stage import StageContext, run_stage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """One faiss thread for the direct k-means calls (results depend on the count; 2 thrash on a shared box)."""
    before = faiss.omp_get_max_threads()
    set_threads(1)
    yield
    set_threads(before)


def blobs(k: int, per: int, d: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 [k*per, d] unit vectors around k random unit centres, and int64 [k*per] blob labels (shuffled)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(k), per))
    x = centres[labels] + noise * rng.standard_normal((len(labels), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _meta(ids: list[str], folder: str) -> dict:
    n = len(ids)
    return {
        "id": pa.array(ids, pa.string()),
        "source": pa.array([folder] * n, pa.string()),
        "path": pa.array([f"/{folder}/{i}.png" for i in ids], pa.string()),
        "member": pa.nulls(n, pa.string()),
        "width": pa.array([64] * n, pa.int32()),
        "height": pa.array([48] * n, pa.int32()),
        "nbytes": pa.array([1000 + i for i in range(n)], pa.int64()),
        "sha256": pa.array([_sha(i) for i in ids], pa.string()),
    }


def write_upstream(root: Path, pool: np.ndarray, seeds: dict[str, tuple[np.ndarray, list[str] | None]]) -> np.ndarray:
    """Commit synthetic `decontaminate` and `embed_ssl` stages under `root`.

    The manifest has one dropped row (keep=False) after every 4 kept ones, so pool index != row_id. A seed set is
    (vectors, sha256 list or None for fresh images).

    Returns:
        int64 [n_pool] row_id of each pool index.
    """
    n = len(pool)
    n_rows = n + n // 4
    keep = np.ones(n_rows, dtype=bool)
    keep[4::5] = False
    keep[np.flatnonzero(keep)[n:]] = False
    ids = [f"p{i:05d}" for i in range(n_rows)]
    manifest = pa.table({**_meta(ids, "pool"), "keep": pa.array(keep)})
    dec = root / "decontaminate"
    artifacts.write_parquet_atomic(dec / "manifest.parquet", manifest)
    artifacts.commit_stage(dec, "synthetic", ["manifest.parquet"], {"inputs": n_rows, "outputs": n})
    row_id = np.flatnonzero(keep).astype(np.int64)
    emb = root / "embed_ssl"
    artifacts.write_npy_atomic(emb / "pool.npy", pool)
    artifacts.write_parquet_atomic(emb / "pool_rows.parquet", pa.table(
        {"row_id": pa.array(row_id, pa.int64()), "id": pa.array([ids[r] for r in row_id], pa.string())}))
    outputs = ["pool.npy", "pool_rows.parquet"]
    for name, (vec, shas) in seeds.items():
        sids = [f"s-{name}-{i:03d}" for i in range(len(vec))]
        meta = _meta(sids, f"seeds-{name}")
        if shas is not None:
            meta["sha256"] = pa.array(shas, pa.string())
        artifacts.write_npy_atomic(emb / f"seed-{name}.npy", vec)
        artifacts.write_parquet_atomic(emb / f"seed-{name}.parquet", pa.table(meta))
        outputs += [f"seed-{name}.npy", f"seed-{name}.parquet"]
    artifacts.commit_stage(emb, "synthetic", outputs, {"inputs": n, "outputs": n})
    return row_id


def make_cfg(seed_sets: list[SeedSetConfig] | None = None, **cluster_kw) -> CurateConfig:
    cfg = load_config()
    # One thread: results are only comparable at a fixed thread count, and 2 threads thrash on a shared CI box.
    cfg.cluster = KMeansConfig(**{"threads": 1, "iterations": 10, **cluster_kw})
    cfg.retrieve = RetrieveConfig(seed_sets=list(seed_sets or []))
    return cfg


def purity(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of points in the majority label of their cluster."""
    return float(sum(np.bincount(b[a == c]).max() for c in np.unique(a)) / len(a))


def read_selected(root: Path) -> tuple[pa.Table, pa.Table]:
    d = root / "retrieve"
    return artifacts.read_table(d / "selected.parquet"), artifacts.read_table(d / "retrieval.parquet")


# --------------------------------------------------------------------------------------------------------- k-means


def test_cluster_stage_recovers_blobs_deterministically(tmp_path: Path) -> None:
    x, labels = blobs(8, 150, 16, 0.05, seed=0)
    cfg = make_cfg(mode="kmeans", n_clusters=8, init="kmeans++")
    outs = []
    for run in ("a", "b"):
        write_upstream(tmp_path / run, x, {})
        res = run_stage(cluster.STAGE, StageContext(cfg, tmp_path / run))
        assert not res.skipped and res.counts["clusters"] == 8 and res.counts["empty_clusters"] == 0
        outs.append({f: (tmp_path / run / "cluster" / f).read_bytes() for f in cluster.OUTPUTS})
    assert outs[0] == outs[1]
    assert not (tmp_path / "a" / "cluster" / "_work").exists()
    assert run_stage(cluster.STAGE, StageContext(cfg, tmp_path / "a")).skipped

    cent, lab, offsets, members = cluster.load_level(tmp_path / "a" / "cluster")
    assert cent.shape == (8, 16) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)
    # Adjusted purity both ways: every cluster is one blob and every blob one cluster.
    assert purity(lab, labels) == 1.0 and purity(labels, lab) == 1.0
    assert np.array_equal(np.diff(offsets), np.bincount(lab, minlength=8))
    assert np.array_equal(np.sort(members), np.arange(len(x)))
    sims = np.einsum("nd,nd->n", x.astype(np.float32), cent[lab])
    for c in range(8):
        m = members[offsets[c] : offsets[c + 1]]
        assert np.all(lab[m] == c)
        assert np.all(np.diff(sims[m]) <= 1e-3)  # closest to the centroid first


def test_cluster_count_capped_at_pool_size(tmp_path: Path) -> None:
    x, _ = blobs(5, 1, 8, 0.0, seed=1)
    write_upstream(tmp_path, x, {})
    res = run_stage(cluster.STAGE, StageContext(make_cfg(n_clusters=50), tmp_path))
    assert res.counts["clusters"] == 5 and res.counts["levels"][0]["requested"] == 50
    assert sorted(np.load(tmp_path / "cluster" / "assign.npy").tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("init", ["kmeans++", "afkmc2", "random"])
def test_inits_run(init: str) -> None:
    x, labels = blobs(12, 100, 16, 0.05, seed=2)
    res = spherical_kmeans(x, 12, iterations=8, init=init, seed=3)
    assert res.centroids.shape == (12, 16) and np.allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    obj = np.array(res.objective)
    assert len(obj) == 8 and np.all(np.diff(obj) <= 1e-3)  # Lloyd never increases the objective
    lab, _ = assign(x, res.centroids)
    assert purity(lab, labels) >= 0.75
    again = spherical_kmeans(x, 12, iterations=8, init=init, seed=3)
    assert np.array_equal(res.centroids, again.centroids)


class StopAfter(Checkpointer):
    """Saves for real, then raises after `limit` saves: a run killed right after a checkpoint."""

    def __init__(self, work_dir: Path, limit: int) -> None:
        super().__init__(work_dir)
        self.limit, self.saves = limit, 0

    def save(self, tag, centroids, iteration, rng) -> None:
        super().save(tag, centroids, iteration, rng)
        self.saves += 1
        if self.saves >= self.limit:
            raise KeyboardInterrupt


def test_kmeans_resumes_bitwise_from_checkpoint(tmp_path: Path) -> None:
    x, _ = blobs(10, 80, 16, 0.2, seed=4)
    kw = dict(iterations=10, init="afkmc2", seed=5, max_points_per_centroid=60)
    full = spherical_kmeans(x, 10, **kw)
    with pytest.raises(KeyboardInterrupt):
        spherical_kmeans(x, 10, checkpoint=StopAfter(tmp_path, 4), **kw)  # seeding + 3 iterations saved
    assert Checkpointer(tmp_path).load("kmeans")[1] == 3
    counter = StopAfter(tmp_path, 10**9)
    resumed = spherical_kmeans(x, 10, checkpoint=counter, **kw)
    assert counter.saves == 7 and len(resumed.objective) == 7
    assert resumed.objective == full.objective[3:]
    assert np.array_equal(resumed.centroids, full.centroids)


# The victim pauses 50 ms after each checkpoint so that the kill lands mid-run however fast the machine is.
_CHILD = """
import sys
import time
from pathlib import Path
sys.path.insert(0, {repo!r})
from data_pipeline.cluster import cluster
from data_pipeline.cluster import kmeans
_save = kmeans.Checkpointer.save
def slow_save(self, *args):
    _save(self, *args)
    time.sleep(0.05)
kmeans.Checkpointer.save = slow_save
from data_pipeline.core.config import KMeansConfig, load_config
from data_pipeline.core.stage import StageContext, run_stage
cfg = load_config()
cfg.cluster = KMeansConfig(**{kw!r})
run_stage(cluster.STAGE, StageContext(cfg, Path({root!r})))
"""


def test_cluster_stage_killed_mid_run_resumes_identically(tmp_path: Path) -> None:
    x, _ = blobs(10, 300, 32, 0.3, seed=6)
    kw = dict(mode="hierarchical", levels=[60, 6], iterations=8, resample_steps=2, init="kmeans++", threads=1)
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    write_upstream(ref, x, {})
    write_upstream(victim, x, {})
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO), kw=kw, root=str(victim))],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = Checkpointer(victim / "cluster" / "_work")
    killed_at = None
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        saved = ckpt.load("level1_step1") if ckpt.path("level1_step1").is_file() else None
        if saved is not None and saved[1] >= 2:
            child.send_signal(signal.SIGKILL)
            killed_at = saved[1]
            break
        time.sleep(0.002)
    child.wait()
    assert killed_at is not None and child.returncode == -signal.SIGKILL, "the run finished before it was killed"
    assert artifacts.read_success(victim / "cluster") is None
    assert ckpt.load("level1_step0")[1] == 8  # the first k-means run had finished and is not redone

    cfg = make_cfg(**kw)
    run_stage(cluster.STAGE, StageContext(cfg, victim))
    run_stage(cluster.STAGE, StageContext(cfg, ref))
    files = sorted(str(p.relative_to(ref / "cluster")) for p in (ref / "cluster").rglob("*.npy"))
    assert "level2/assign.npy" in files and len(files) == 12
    for f in files:
        assert (ref / "cluster" / f).read_bytes() == (victim / "cluster" / f).read_bytes(), f
    assert len(np.load(ref / "cluster" / "level2" / "assign.npy")) == 60


def test_water_fill() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([1, 5, 100, 3, 50])
    out = water_fill(sizes, 30, rng)
    assert out.sum() == 30 and np.all(out <= sizes)
    assert out[[0, 1, 3]].tolist() == [1, 5, 3] and sorted(out[[2, 4]].tolist()) == [10, 11]
    assert water_fill(sizes, 500, rng).tolist() == sizes.tolist()
    assert water_fill(np.array([7, 7, 7]), 9, rng).tolist() == [3, 3, 3]


def test_hierarchical_balanced_sampling_flattens_digits_long_tail() -> None:
    from sklearn.datasets import load_digits

    feats, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    # 50:1 long tail over the 10 classes (1500 ... 30 images), drawn with replacement plus a little pixel noise.
    sizes = np.round(1500 * 50.0 ** (-np.arange(10) / 9)).astype(int)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), s, replace=True) for c, s in enumerate(sizes)])
    x = feats[idx] + rng.normal(0, 0.5, (len(idx), feats.shape[1]))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cls = y[idx]
    target = 400

    levels = hierarchical_kmeans(x, [300, 50], iterations=6, init="afkmc2", seed=0, resample_steps=2)
    picked = balanced_sample(levels, target, np.random.default_rng(1))
    assert len(picked) == target and len(np.unique(picked)) == target

    def ratio(sel: np.ndarray) -> float:
        share = np.bincount(cls[sel], minlength=10) / len(sel)
        return float(share.max() / share.min()) if share.min() > 0 else float("inf")

    # A uniform draw holds only ~3 images of the rarest class, so its ratio is noisy: take the median of 21 draws.
    uni_rng = np.random.default_rng(1)
    uni = float(np.median([ratio(uni_rng.choice(len(x), target, replace=False)) for _ in range(21)]))
    bal = ratio(picked)
    print(f"max/min class share: balanced {bal:.1f}, uniform {uni:.1f} (median of 21 draws; population "
          f"{sizes[0] / sizes[-1]:.0f})")
    print("balanced counts", np.bincount(cls[picked], minlength=10).tolist())
    assert bal * 3 <= uni


# -------------------------------------------------------------------------------------------------------- retrieve


def test_sample_retrieval_is_exact_knn(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((400, 16))
    pool = (pool / np.linalg.norm(pool, axis=1, keepdims=True)).astype(np.float16)
    seeds = rng.standard_normal((12, 16))
    seeds = (seeds / np.linalg.norm(seeds, axis=1, keepdims=True)).astype(np.float16)
    row_id = write_upstream(tmp_path, pool, {"knn": (seeds, None), "floor": (seeds, None)})
    sets = [SeedSetConfig(name="knn", mode="sample", n_neighbors=5),
            SeedSetConfig(name="floor", mode="sample", n_neighbors=5, min_similarity=0.5)]
    cfg = make_cfg(sets, mode="hierarchical", levels=[20, 4], resample_steps=1, balanced_size=60)
    ctx = StageContext(cfg, tmp_path)
    run_stage(cluster.STAGE, ctx)
    res = run_stage(retrieve.STAGE, ctx)
    selected, long = read_selected(tmp_path)

    sims = seeds.astype(np.float32) @ pool.astype(np.float32).T  # brute force [12, 400]
    top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    expect = {(f"s-knn-{q:03d}", int(row_id[p]), r) for q in range(12) for r, p in enumerate(top[q])}
    got = long.filter(pc.equal(long.column("seed_set"), "knn"))
    assert {(s, r, k) for s, r, k in zip(*(got.column(c).to_pylist() for c in ("seed_id", "row_id", "rank")))} == expect
    assert np.allclose(got.column("similarity").to_numpy(), [sims[int(s[-3:]), np.searchsorted(row_id, r)]
                       for s, r in zip(got.column("seed_id").to_pylist(), got.column("row_id").to_pylist())],
                       atol=1e-5)
    floor = long.filter(pc.equal(long.column("seed_set"), "floor"))
    assert floor.num_rows == sum(1 for q in range(12) for p in top[q] if sims[q, p] >= 0.5)
    assert min(floor.column("similarity").to_pylist()) >= 0.5

    balanced = long.filter(pc.equal(long.column("mode"), "balanced"))
    assert balanced.num_rows == 60 and len(set(balanced.column("row_id").to_pylist())) == 60
    assert res.counts["sets"]["knn"]["sample"]["retrieved"] == 60
    assert res.counts["sets"]["(balanced)"]["balanced"]["unique"] == 60
    assert res.counts["outputs"] == selected.num_rows == len(set(long.column("row_id").to_pylist()))
    # The selection holds each image once, sorted by (row_id, id), with every reason.
    rows = selected.column("row_id").to_pylist()
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    n_reasons = sum(len(json.loads(r)) for r in selected.column("reasons").to_pylist())
    assert n_reasons == long.num_rows


def test_cluster_retrieval_picks_clusters_with_more_than_3_seeds(tmp_path: Path) -> None:
    pool, labels = blobs(6, 60, 16, 0.05, seed=8)
    x32 = pool.astype(np.float32)
    # 5, 4, 3 and 1 seeds near blobs 0, 1, 2, 3: only blobs 0 and 1 hold more than 3.
    pick = np.concatenate([np.flatnonzero(labels == b)[:n] for b, n in ((0, 5), (1, 4), (2, 3), (3, 1))])
    seeds = x32[pick].astype(np.float16)
    write_upstream(tmp_path, pool, {"capped": (seeds, None), "all": (seeds, None)})
    sets = [SeedSetConfig(name="capped", mode="cluster", per_cluster=20, min_seeds_in_cluster=3, max_images=30),
            SeedSetConfig(name="all", mode="cluster", per_cluster=20, min_seeds_in_cluster=3, max_images=1000)]
    ctx = StageContext(make_cfg(sets, n_clusters=6), tmp_path)
    run_stage(cluster.STAGE, ctx)
    res = run_stage(retrieve.STAGE, ctx)
    selected, long = read_selected(tmp_path)
    lab = np.load(tmp_path / "cluster" / "assign.npy")
    wanted = {int(lab[np.flatnonzero(labels == 0)[0]]), int(lab[np.flatnonzero(labels == 1)[0]])}
    got = {}
    for name, total in (("capped", 30), ("all", 40)):
        part = long.filter(pc.equal(long.column("seed_set"), name))
        clusters = part.column("cluster").to_numpy()
        assert part.num_rows == total and set(clusters.tolist()) == wanted
        assert np.bincount(clusters).max() <= 20
        assert set(part.column("mode").to_pylist()) == {"cluster"}
        got[name] = set(part.column("row_id").to_pylist())
    # Each set draws with its own seeded generator, so the two selections overlap only partly.
    both = len(got["capped"] & got["all"])
    assert selected.num_rows == len(got["capped"] | got["all"])
    assert res.counts["sets"]["capped"]["cluster"] == {"retrieved": 30, "unique": 30, "collisions": both}
    assert res.counts["sets"]["all"]["cluster"] == {"retrieved": 40, "unique": 40, "collisions": both}
    for cl, reasons in zip(selected.column("cluster").to_pylist(), selected.column("reasons").to_pylist()):
        for r in json.loads(reasons):
            assert r["mode"] == "cluster" and r["cluster"] == cl and r["seed_id"].startswith(f"s-{r['seed_set']}-")


def test_as_is_rows_and_reasons(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    pool = rng.standard_normal((50, 8))
    pool = (pool / np.linalg.norm(pool, axis=1, keepdims=True)).astype(np.float16)
    # Seeds 0 and 1 are pool images 3 and 7 (same bytes => same sha256); seed 2 is new.
    row_id = write_upstream(tmp_path, pool, {})
    shas = [_sha(f"p{row_id[3]:05d}"), _sha(f"p{row_id[7]:05d}"), _sha("fresh")]
    write_upstream(tmp_path, pool, {"mine": (pool[[3, 7, 0]], shas), "near": (pool[[3]], None)})
    sets = [SeedSetConfig(name="mine", mode="as_is"), SeedSetConfig(name="near", mode="sample", n_neighbors=1)]
    ctx = StageContext(make_cfg(sets, n_clusters=4), tmp_path)
    run_stage(cluster.STAGE, ctx)
    res = run_stage(retrieve.STAGE, ctx)
    selected, long = read_selected(tmp_path)

    assert selected.column("row_id").to_pylist() == [-1, int(row_id[3]), int(row_id[7])]
    assert selected.column("id").to_pylist() == ["s-mine-002", f"p{row_id[3]:05d}", f"p{row_id[7]:05d}"]
    assert selected.column("cluster").to_pylist()[0] == -1
    assert selected.column("path").to_pylist()[0] == "/seeds-mine/s-mine-002.png"
    first = json.loads(selected.column("reasons").to_pylist()[1])
    assert [r["mode"] for r in first] == ["as_is", "sample"]
    assert first[0] == {"seed_set": "mine", "seed_id": "s-mine-000", "mode": "as_is", "similarity": 1.0}
    assert first[1]["seed_id"] == "s-near-000" and first[1]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert long.num_rows == 4 and res.counts["outside_pool"] == 1
    assert res.counts["sets"]["near"]["sample"] == {"retrieved": 1, "unique": 1, "collisions": 1}
    assert res.counts["sets"]["mine"]["as_is"] == {"retrieved": 3, "unique": 3, "collisions": 1}
