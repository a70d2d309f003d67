"""Global stages in slices (`executors.run_slices`): the copy-detection kNN graph and the decontamination search as
query slices against the shared on-disk index, k-means assignment as slices whose centroid sums the driver reduces.
Run here or as SLURM job arrays, they give the same bytes, and a lost slice is redone alone.

Upstream artifacts are synthetic (a near_dedup manifest, embed_copy / embed_ssl vectors), committed with
`artifacts.commit_stage` so that the stages' `ctx.require` passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.cluster import cluster
from data_pipeline.cluster.kmeans import Slicing, assign, assign_all, hierarchical_kmeans, spherical_kmeans
from data_pipeline.core import artifacts
from data_pipeline.core.config import HashConfig, load_config
from data_pipeline.core.executors import SliceFailure, SliceTask, run_here, run_slices, slice_runner
from data_pipeline.core.knn import KnnParams
from data_pipeline.core.stage import StageContext, run_stage
from data_pipeline.dedup.copy_dedup import STAGE as COPY_STAGE
from data_pipeline.dedup.copy_dedup import SharedIndex, pair_slice, self_pairs
from data_pipeline.dedup.decontaminate import STAGE as DECON_STAGE
from data_pipeline.dedup.near_dedup import near_pairs

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pool(n: int, seed: int) -> np.ndarray:
    """float16 [n, D] unit rows: a third are triples of near-copies (cos ~0.9), the rest random, shuffled."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((n // 9, D)))
    copies = np.repeat(base, 3, axis=0) + 0.06 * rng.standard_normal((3 * len(base), D))
    x = np.vstack([copies, rng.standard_normal((n - len(copies), D))])
    return _unit(x[rng.permutation(n)]).astype(np.float16)


def _write_copy_upstream(root: Path, pool: np.ndarray, evals: np.ndarray) -> None:
    """near_dedup manifest (every row kept, one pool vector each) and embed_copy pool + eval set `ev`."""
    n = len(pool)
    ids = [f"id{i:06d}" for i in range(n)]
    manifest = pa.table({
        "id": ids, "source": ["src"] * n, "path": [f"/data/{i}.jpg" for i in range(n)],
        "member": pa.array([None] * n, pa.string()), "nbytes": pa.array([1000] * n, pa.int64()),
        "sha256": [f"{i:064x}" for i in range(n)], "status": ["ok"] * n, "reject_reason": [""] * n,
        "width": pa.array(64 + np.arange(n) % 7, pa.int64()), "height": pa.array([64] * n, pa.int64()),
        "dup_group": pa.array(np.arange(n), pa.int64()), "dup_of": [""] * n, "dup_kind": [""] * n,
        "keep": [True] * n,
    })
    nd = root / "near_dedup"
    artifacts.write_parquet_atomic(nd / "manifest.parquet", manifest)
    artifacts.commit_stage(nd, "near-fp", ["manifest.parquet"], {})
    ec = root / "embed_copy"
    artifacts.write_npy_atomic(ec / "pool.npy", pool)
    artifacts.write_parquet_atomic(ec / "pool_rows.parquet", pa.table(
        {"row_id": pa.array(np.arange(n), pa.int64()), "id": ids}))
    m = len(evals)
    artifacts.write_npy_atomic(ec / "eval-ev.npy", evals)
    artifacts.write_parquet_atomic(ec / "eval-ev.parquet", pa.table({
        "id": [f"ev-{k}" for k in range(m)], "source": ["ev"] * m, "path": [f"/eval/{k}.jpg" for k in range(m)],
        "member": pa.array([None] * m, pa.string()), "width": pa.array([64] * m, pa.int64()),
        "height": pa.array([64] * m, pa.int64())}))
    artifacts.commit_stage(ec, "embed-fp", ["pool.npy", "pool_rows.parquet", "eval-ev.npy", "eval-ev.parquet"], {})


def _write_ssl_upstream(root: Path, pool: np.ndarray) -> None:
    emb = root / "embed_ssl"
    artifacts.write_npy_atomic(emb / "pool.npy", pool)
    artifacts.write_parquet_atomic(emb / "pool_rows.parquet", pa.table({
        "row_id": pa.array(np.arange(len(pool)), pa.int64()), "id": [f"p{i:06d}" for i in range(len(pool))]}))
    artifacts.commit_stage(emb, "synthetic", ["pool.npy", "pool_rows.parquet"], {})


def _evals(pool: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Half noisy copies of pool images (cos ~0.8), half random images."""
    rng = np.random.default_rng(seed)
    near = pool[rng.choice(len(pool), m // 2, replace=False)].astype(np.float32)
    near = near + 0.09 * rng.standard_normal(near.shape)
    return _unit(np.vstack([near, rng.standard_normal((m - m // 2, D))])).astype(np.float16)


def _mtimes(files: list[Path]) -> list[int]:
    return [f.stat().st_mtime_ns for f in files]


# --------------------------------------------------------------------------------------------- run_slices


def _write_index(value: int, out_path: str) -> None:
    artifacts.write_npy_atomic(Path(out_path), np.array([value]))


class _Flaky:
    """Slice body that raises on its first `fails` calls, then writes its output."""

    def __init__(self, fails: int) -> None:
        self.fails, self.calls = fails, 0

    def __call__(self, value: int, out_path: str) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise OSError("transient")
        _write_index(value, out_path)


def test_run_slices_here_skips_done_slices_and_retries(tmp_path):
    cfg = load_config(None, ["executor.max_retries=1"])
    tasks = [SliceTask(i, _write_index, (i,), str(tmp_path / f"s{i}.npy")) for i in range(3)]
    _write_index(99, tasks[1].out_path)  # a slice done by an earlier run is not redone
    run_slices(tasks, cfg, tmp_path / "logs", "t")
    assert [int(np.load(t.out_path)[0]) for t in tasks] == [0, 99, 2]
    flaky = _Flaky(1)
    run_slices([SliceTask(3, flaky, (3,), str(tmp_path / "s3.npy"))], cfg, tmp_path / "logs", "t")
    assert flaky.calls == 2 and (tmp_path / "s3.npy").is_file()
    broken = _Flaky(5)
    with pytest.raises(OSError, match="transient"):  # the last try's error comes through with its traceback
        run_slices([SliceTask(4, broken, (4,), str(tmp_path / "s4.npy"))], cfg, tmp_path / "logs", "t")
    assert broken.calls == 2 and not (tmp_path / "s4.npy").exists()


def test_slice_rows_must_be_positive():
    for key in ("hash.slice_rows", "copy_dedup.slice_rows", "cluster.slice_rows"):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=0"])


# ------------------------------------------------------------------------------------------- kNN slices


def test_copy_pairs_in_slices_equal_one_slice_and_a_lost_slice_is_redone_alone(tmp_path):
    np.save(tmp_path / "pool.npy", _pool(1800, seed=1))
    pool = np.load(tmp_path / "pool.npy", mmap_mode="r")
    params = KnnParams(index="ivf", threads=1, nprobe=8)
    whole = self_pairs(pool, 8, 0.5, params, tmp_path / "whole")
    sliced = self_pairs(pool, 8, 0.5, params, tmp_path / "sliced", run_here, 500)
    files = sorted((tmp_path / "sliced").glob("pairs-*.parquet"))
    assert len(files) == 4 and (tmp_path / "sliced" / "index.faiss").is_file()
    for w, s in zip(whole[:3], sliced[:3]):
        assert w.tobytes() == s.tobytes()
    assert len(whole[0]) > 500  # the planted triples give edges
    lost = files[2]
    lost_bytes = lost.read_bytes()
    lost.unlink()
    before = _mtimes(files[:2] + files[3:])
    again = self_pairs(pool, 8, 0.5, params, tmp_path / "sliced", run_here, 500)
    assert _mtimes(files[:2] + files[3:]) == before and lost.read_bytes() == lost_bytes
    for w, s in zip(whole[:3], again[:3]):
        assert w.tobytes() == s.tobytes()


def test_shared_index_pickles_without_the_index_and_reloads_it(tmp_path):
    import pickle

    np.save(tmp_path / "pool.npy", _pool(900, seed=2))
    pool = np.load(tmp_path / "pool.npy", mmap_mode="r")
    shared = SharedIndex.build(pool, KnnParams(index="ivf", threads=1), tmp_path / "index.faiss")
    blob = pickle.dumps(shared)
    assert len(blob) < 4096  # the pool travels as its file name, the index as the shared index file
    copy = pickle.loads(blob)
    a = shared.searcher().search(pool[:50], 5)
    b = copy.searcher().search(pool[:50], 5)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):  # never silently retrained in a task
        pickle.loads(blob).searcher()


def _hashes(n: int, seed: int) -> np.ndarray:
    """uint64 [n]: random hashes, a quarter of them with a near copy (1-3 bits flipped)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    src = rng.choice(n, n // 4, replace=False)
    dst = rng.choice(n, n // 4, replace=False)
    flips = np.zeros(n // 4, dtype=np.uint64)
    for _ in range(3):
        flips |= np.uint64(1) << rng.integers(0, 64, size=n // 4).astype(np.uint64)
    h[dst] = h[src] ^ flips
    return h


@pytest.mark.parametrize("index", ["flat", "multihash"])
def test_near_pairs_in_slices_equal_in_memory_and_a_lost_slice_is_redone_alone(tmp_path, index):
    h = _hashes(3000, seed=11)
    cfg = HashConfig(threshold=4, index=index, threads=1)
    ref = near_pairs(h, cfg)
    assert len(ref[0]) > 300
    sliced = near_pairs(h, cfg, 700, tmp_path)
    files = sorted(tmp_path.glob("pairs-*.parquet"))
    assert len(files) == 5
    files[3].unlink()
    before = _mtimes(files[:3] + files[4:])
    again = near_pairs(h, cfg, 700, tmp_path)
    assert _mtimes(files[:3] + files[4:]) == before and files[3].is_file()
    for r, a, b in zip(ref, sliced, again):
        assert r.tobytes() == a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------- k-means slices


def test_kmeans_one_slice_is_the_unsliced_result(tmp_path):
    np.save(tmp_path / "x.npy", _pool(3000, seed=3))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    kw = dict(iterations=4, seed=[0, 1, 0], max_points_per_centroid=200)
    ref = spherical_kmeans(x, 12, **kw)
    one = spherical_kmeans(x, 12, slicing=Slicing(run_here, tmp_path / "w", 1 << 18), **kw)
    assert ref.centroids.tobytes() == one.centroids.tobytes() and ref.objective == one.objective
    labels, sims = assign(x, ref.centroids)
    l1, s1 = assign_all(x, ref.centroids, slicing=Slicing(run_here, tmp_path / "w", 1 << 18))
    assert labels.tobytes() == l1.tobytes() and sims.tobytes() == s1.tobytes()
    # Several slices: the float sums are reduced in another order, so only close to the unsliced centroids.
    many = spherical_kmeans(x, 12, slicing=Slicing(run_here, tmp_path / "w", 700), **kw)
    np.testing.assert_allclose(many.centroids, ref.centroids, atol=1e-5)
    assert not any((tmp_path / "w").iterdir())  # slice files and points copies are gone once reduced


class _KilledAfter:
    """Runner that runs the first `n` slices of the first call it gets, then dies (a run killed mid-array)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, tasks: list[SliceTask], desc: str = "") -> None:
        run_here(tasks[: self.n], desc)
        raise KeyboardInterrupt


class _Recorder:
    """Runner that records which slices had no output (so were computed), then runs them here."""

    def __init__(self) -> None:
        self.computed: list[tuple[str, int]] = []

    def __call__(self, tasks: list[SliceTask], desc: str = "") -> None:
        self.computed += [(desc, t.index) for t in tasks if not Path(t.out_path).is_file()]
        run_here(tasks, desc)


def test_kmeans_killed_mid_iteration_redoes_only_the_missing_slices(tmp_path):
    np.save(tmp_path / "x.npy", _pool(2000, seed=4))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    kw = dict(iterations=3, seed=[0, 1, 0])
    ref = spherical_kmeans(x, 10, slicing=Slicing(run_here, tmp_path / "ref", 500), **kw)
    with pytest.raises(KeyboardInterrupt):
        spherical_kmeans(x, 10, slicing=Slicing(_KilledAfter(3), tmp_path / "w", 500), **kw)
    assert len(list((tmp_path / "w" / "kmeans-it0000").glob("slice-*.npz"))) == 3
    rec = _Recorder()
    resumed = spherical_kmeans(x, 10, slicing=Slicing(rec, tmp_path / "w", 500), **kw)
    assert rec.computed[:1] == [("k-means kmeans-it0000", 3)]  # of the first iteration, only the lost slice
    assert len(rec.computed) == 1 + 2 * 4
    assert resumed.centroids.tobytes() == ref.centroids.tobytes()


def test_hierarchical_kmeans_sliced_is_deterministic(tmp_path):
    np.save(tmp_path / "x.npy", _pool(1500, seed=5))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    kw = dict(iterations=2, resample_steps=1, seed=3)
    a = hierarchical_kmeans(x, [15, 3], slicing=Slicing(run_here, tmp_path / "a", 400), **kw)
    b = hierarchical_kmeans(x, [15, 3], slicing=Slicing(run_here, tmp_path / "b", 400), **kw)
    ref = hierarchical_kmeans(x, [15, 3], **kw)
    one = hierarchical_kmeans(x, [15, 3], slicing=Slicing(run_here, tmp_path / "c", 1 << 18), **kw)
    for la, lb, lr, lo in zip(a, b, ref, one):
        assert la.centroids.tobytes() == lb.centroids.tobytes() and la.assign.tobytes() == lb.assign.tobytes()
        np.testing.assert_allclose(la.centroids, lr.centroids, atol=1e-5)
        assert lo.centroids.tobytes() == lr.centroids.tobytes() and lo.assign.tobytes() == lr.assign.tobytes()


# ----------------------------------------------------------------------------------- the SLURM job arrays


def _slurm_overrides(slurm_cluster, tmp_path: Path) -> list[str]:
    array = tmp_path / "array.yaml"
    array.write_text("cpus_per_task: 1\nmem_gb: 2\ntimeout_min: 10\n")
    return ["executor.kind=slurm", f"executor.slurm_files=[{array}]",
            f"executor.slurm_partition={slurm_cluster.partition}", "executor.max_retries=1"]


def _logs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*_log.out"))


@pytest.mark.slurm
def test_copy_dedup_and_decontaminate_slurm_arrays_byte_identical(slurm_cluster, tmp_path):
    pool = _pool(3000, seed=6)
    evals = _evals(pool, 1700, seed=7)
    common = ["copy_dedup.index=ivf", "copy_dedup.k=16", "copy_dedup.nprobe=8", "copy_dedup.threads=1",
              "copy_dedup.slice_rows=800", "copy_dedup.recall_sample=200", "decontaminate.eval_sets=[ev=/x]",
              "decontaminate.nprobe=8"]  # 8 of 76 lists: an exhaustive search would match every component here
    runs = {"local": common, "slurm": common + _slurm_overrides(slurm_cluster, tmp_path)}
    for name, overrides in runs.items():
        _write_copy_upstream(tmp_path / name, pool, evals)
        ctx = StageContext(load_config(None, overrides), tmp_path / name)
        for stage in (COPY_STAGE, DECON_STAGE):
            assert not run_stage(stage, ctx).failed_shards
    # 4 copy-dedup slices and 3 decontamination slices ran as SLURM array tasks.
    assert len(_logs(tmp_path / "slurm" / "_executor" / "copy_dedup")) == 4
    assert len(_logs(tmp_path / "slurm" / "_executor" / "decontaminate")) == 3
    assert not (tmp_path / "local" / "_executor").exists()
    for f in ("copy_dedup/manifest.parquet", "copy_dedup/edges.parquet", "copy_dedup/audit.parquet",
              "copy_dedup/components.json", "decontaminate/manifest.parquet", "decontaminate/matches.parquet",
              "decontaminate/audit.parquet"):
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "slurm" / f).read_bytes(), f
    removed = artifacts.read_table(tmp_path / "local" / "decontaminate" / "manifest.parquet").column("keep")
    assert 0 < removed.to_pylist().count(False) < len(pool)  # both stages really removed something


@pytest.mark.slurm
def test_slurm_lost_slice_is_redone_alone_and_failing_slice_is_retried_then_reported(slurm_cluster, tmp_path):
    np.save(tmp_path / "pool.npy", _pool(2400, seed=8))
    pool = np.load(tmp_path / "pool.npy", mmap_mode="r")
    params = KnnParams(index="ivf", threads=1, nprobe=8)
    cfg = load_config(None, _slurm_overrides(slurm_cluster, tmp_path))
    logs = slurm_cluster.log_root / "lost"
    run = slice_runner(cfg, logs)
    ref = self_pairs(pool, 8, 0.5, params, tmp_path / "local", run_here, 800)
    first = self_pairs(pool, 8, 0.5, params, tmp_path / "w", run, 800)
    files = sorted((tmp_path / "w").glob("pairs-*.parquet"))
    assert len(files) == 3 and len(_logs(logs)) == 3
    files[1].unlink()
    before = _mtimes([files[0], files[2]])
    again = self_pairs(pool, 8, 0.5, params, tmp_path / "w", run, 800)
    assert len(_logs(logs)) == 4 and _mtimes([files[0], files[2]]) == before  # one more array task, nothing else
    for r, a, b in zip(ref[:3], first[:3], again[:3]):
        assert r.tobytes() == a.tobytes() == b.tobytes()

    # A slice whose shared index is missing fails in its array task: resubmitted once (max_retries=1), then
    # reported by index, while the healthy slice's output stays.
    broken = SharedIndex(pool, params, tmp_path / "missing.faiss")
    healthy = SharedIndex.build(pool, params, tmp_path / "w" / "index.faiss")
    tasks = [SliceTask(0, pair_slice, (healthy, 0, 800, 8, 0.5), str(tmp_path / "f" / "ok.parquet")),
             SliceTask(1, pair_slice, (broken, 800, 1600, 8, 0.5), str(tmp_path / "f" / "bad.parquet"))]
    fail_logs = slurm_cluster.log_root / "failing"
    with pytest.raises(SliceFailure, match=r"slices \[1\] failed after 1 retries"):
        run_slices(tasks, cfg, fail_logs, "broken")
    assert (tmp_path / "f" / "ok.parquet").is_file() and not (tmp_path / "f" / "bad.parquet").exists()
    assert len(_logs(fail_logs)) == 3  # both slices, then the failing one again


@pytest.mark.slurm
def test_near_pairs_slurm_array_byte_identical(slurm_cluster, tmp_path):
    h = _hashes(3000, seed=12)
    cfg = HashConfig(threshold=4, index="multihash", threads=1)
    logs = slurm_cluster.log_root / "near"
    run = slice_runner(load_config(None, _slurm_overrides(slurm_cluster, tmp_path)), logs)
    ref = near_pairs(h, cfg)
    on_slurm = near_pairs(h, cfg, 1000, tmp_path / "w", run)
    assert len(_logs(logs)) == 3
    for r, s in zip(ref, on_slurm):
        assert r.tobytes() == s.tobytes()


def _cluster_outputs(root: Path) -> list[Path]:
    return sorted(p.relative_to(root / "cluster") for p in (root / "cluster").rglob("*.npy"))


@pytest.mark.slurm
def test_kmeans_slurm_arrays_byte_identical(slurm_cluster, tmp_path):
    pool = _pool(3000, seed=9)
    common = ["cluster.mode=kmeans", "cluster.n_clusters=12", "cluster.iterations=2", "cluster.threads=1",
              "cluster.slice_rows=1000", "cluster.max_points_per_centroid=0"]
    runs = {"local": common, "slurm": common + _slurm_overrides(slurm_cluster, tmp_path)}
    for name, overrides in runs.items():
        _write_ssl_upstream(tmp_path / name, pool)
        assert not run_stage(cluster.STAGE, StageContext(load_config(None, overrides), tmp_path / name)).skipped
    # 2 Lloyd iterations and the whole-pool assignment, 3 slices each, all as SLURM array tasks.
    assert len(_logs(tmp_path / "slurm" / "_executor" / "cluster")) == 9
    files = _cluster_outputs(tmp_path / "local")
    assert [str(f) for f in files] == ["assign.npy", "centroids.npy", "members.npy", "offsets.npy"]
    assert files == _cluster_outputs(tmp_path / "slurm")
    for f in files:
        assert (tmp_path / "local" / "cluster" / f).read_bytes() == (tmp_path / "slurm" / "cluster" / f).read_bytes()
    assert not (tmp_path / "slurm" / "cluster" / "_work").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_hierarchical_kmeans_slurm_arrays_byte_identical(slurm_cluster, tmp_path):
    pool = _pool(2000, seed=10)
    common = ["cluster.mode=hierarchical", "cluster.levels=[12,3]", "cluster.iterations=1", "cluster.threads=1",
              "cluster.resample_steps=1", "cluster.slice_rows=700", "cluster.max_points_per_centroid=0"]
    runs = {"local": common, "slurm": common + _slurm_overrides(slurm_cluster, tmp_path)}
    for name, overrides in runs.items():
        _write_ssl_upstream(tmp_path / name, pool)
        run_stage(cluster.STAGE, StageContext(load_config(None, overrides), tmp_path / name))
    files = _cluster_outputs(tmp_path / "local")
    assert len(files) == 12 and files == _cluster_outputs(tmp_path / "slurm")
    for f in files:
        assert (tmp_path / "local" / "cluster" / f).read_bytes() == (tmp_path / "slurm" / "cluster" / f).read_bytes()


def test_cli_reports_failed_slices_in_one_line(tmp_path, monkeypatch, capsys):
    from data_pipeline import curate as cli

    def failing(*args, **kwargs):
        raise SliceFailure("copy_dedup kNN: slices [2] failed after 1 retries; re-run to retry them")

    monkeypatch.setattr(cli, "curate", failing)
    assert cli.main(["--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: copy_dedup kNN: slices [2] failed after 1 retries; re-run to retry them"]
