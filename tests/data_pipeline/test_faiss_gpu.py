"""Faiss on GPUs: device choice and its CPU fallback, the one-faiss-build check (against real dist-info folders),
and, on a machine whose faiss sees a GPU, GPU results compared with CPU results on the same data (marked `gpu`)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.cluster.kmeans import assign, spherical_kmeans
from data_pipeline.core import faiss_gpu
from data_pipeline.core.config import load_config
from data_pipeline.core.knn import (
    KnnParams,
    Searcher,
    exact_search,
    index_to_bytes,
    measure_recalls,
    searcher_from_bytes,
)


def _dist_info(site: Path, name: str, version: str, files: list[str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def test_two_faiss_builds_fail_loudly(tmp_path):
    site = tmp_path / "site-packages"
    _dist_info(site, "faiss-cpu", "1.9.0", ["faiss/__init__.py", "faiss/swigfaiss.py"])
    _dist_info(site, "numpy", "2.0.0", ["numpy/__init__.py"])
    dists = lambda: list(importlib.metadata.distributions(path=[str(site)]))  # noqa: E731
    assert faiss_gpu.check_single_faiss(dists()) == "faiss-cpu"
    _dist_info(site, "faiss-gpu-cu12", "1.9.0", ["faiss/__init__.py", "faiss/swigfaiss_avx2.py"])
    assert faiss_gpu.faiss_distributions(dists()) == ["faiss-cpu", "faiss-gpu-cu12"]
    with pytest.raises(RuntimeError, match="faiss-cpu, faiss-gpu-cu12.*pip uninstall -y faiss-cpu"):
        faiss_gpu.check_single_faiss(dists())


def test_this_environment_has_exactly_one_faiss():
    assert "faiss" in faiss_gpu.check_single_faiss()


def test_device_choice_and_cpu_fallback():
    assert faiss_gpu.use_gpu("cpu") is False
    with pytest.raises(ValueError, match="faiss device must be one of"):
        faiss_gpu.use_gpu("cuda")
    if faiss_gpu.gpu_count() == 0:
        assert faiss_gpu.use_gpu("auto") is False
        with pytest.raises(RuntimeError, match="device=gpu"):
            faiss_gpu.use_gpu("gpu")
        # auto falls back to the CPU path: same bits as an explicit cpu run
        rng = np.random.default_rng(0)
        x = rng.standard_normal((300, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        a = Searcher(x, KnnParams(device="auto", threads=1)).search(x[:20], 5)
        b = Searcher(x, KnnParams(device="cpu", threads=1)).search(x[:20], 5)
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="knn device"):
        KnnParams(device="tpu")


def test_replicate_or_shard():
    gib = 1 << 30
    assert faiss_gpu.shard_decision(10 * gib, n_gpus=1, free_bytes=gib) is False  # one GPU: nothing to shard over
    assert faiss_gpu.shard_decision(gib, n_gpus=8, free_bytes=40 * gib) is False  # fits each GPU: replicate
    assert faiss_gpu.shard_decision(30 * gib, n_gpus=8, free_bytes=40 * gib) is True  # too big for one: shard
    assert faiss_gpu.shard_decision(gib, n_gpus=2, free_bytes=0) is True  # unknown free memory: shard


def test_device_config_keys():
    assert load_config(None, ["copy_dedup.device=cpu", "cluster.device=gpu"]).cluster.device == "gpu"
    for key in ("copy_dedup.device", "cluster.device"):
        with pytest.raises(ValueError, match=key):
            load_config(None, [f"{key}=cuda"])


# ------------------------------------------------------------------ GPU against CPU on the same data

GPU_REASON = ("faiss sees no GPU: a CPU-only faiss build (e.g. the offline GPU bundle, where no faiss GPU build fits "
              "64 MiB: see .gpu_bundle/manifest.json) or no CUDA device")


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture
def needs_faiss_gpu():
    if faiss_gpu.gpu_count() == 0:
        pytest.skip(GPU_REASON)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_knn_gpu_matches_cpu(needs_faiss_gpu, kind):
    base = _clustered(20_000, 64, 200, seed=1)
    # GPUs build 8-bit PQ codes (Faiss has no GPU fast-scan): the CPU side builds the same form to compare with.
    params = dict(index=kind, nlist=128, nprobe=16, pq_m=16, rerank=128, threads=4, pq_fast_scan=False)
    cpu = Searcher(base, KnnParams(device="cpu", **params))
    gpu = Searcher(base, KnnParams(device="gpu", **params))
    assert gpu.gpu and not cpu.gpu
    (cs, ci), (gs, gi) = cpu.search_self(0, 2000, 16), gpu.search_self(0, 2000, 16)
    same = (ci == gi).all(axis=1)
    if kind == "flat":
        # Exact search: rows differ only where two neighbours tie within float32 rounding at the k-th place.
        assert same.mean() >= 0.995
    else:
        # The coarse k-means ran on the GPU, so the lists differ a little; what the stage reports, recall against
        # exact search, must not.
        [rc] = measure_recalls(base, 16, cpu.params, 500, searcher=cpu)
        [rg] = measure_recalls(base, 16, gpu.params, 500, searcher=gpu)
        assert abs(rc - rg) <= 0.01 and same.mean() >= 0.9
    common = ci == gi
    assert np.array_equal(cs[common], gs[common])  # exact CPU re-scoring: the same pair has the same bits


@pytest.mark.gpu
def test_exact_search_and_index_roundtrip_on_gpu(needs_faiss_gpu):
    base = _clustered(30_000, 32, 100, seed=2)
    q = base[:500]
    cs, ci = exact_search(base, q, 10, KnnParams(device="cpu", base_block=8192, threads=4))
    gs, gi = exact_search(base, q, 10, KnnParams(device="gpu", base_block=8192, threads=4))
    assert (ci == gi).all(axis=1).mean() >= 0.995
    gpu = Searcher(base, KnnParams(index="ivf", nlist=64, device="gpu"))
    back = searcher_from_bytes(base, KnnParams(index="ivf", nlist=64, device="cpu"), index_to_bytes(gpu))
    assert back.index.ntotal == len(base) and not back.gpu
    assert (back.search(q, 10)[1] == gpu.search(q, 10)[1]).all(axis=1).mean() >= 0.95


@pytest.mark.gpu
def test_cpu_fast_scan_index_loaded_on_a_gpu_machine_is_searched_on_the_cpu(needs_faiss_gpu):
    base = _clustered(20_000, 64, 200, seed=4)
    params = dict(index="ivfpq", nlist=64, nprobe=8, pq_m=16, threads=4)
    cpu = Searcher(base, KnnParams(device="cpu", **params))
    loaded = searcher_from_bytes(base, KnnParams(device="gpu", **params), index_to_bytes(cpu))
    assert not loaded.gpu  # Faiss has no GPU fast-scan
    a, b = cpu.search(base[:300], 10), loaded.search(base[:300], 10)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


@pytest.mark.gpu
def test_kmeans_gpu_matches_cpu(needs_faiss_gpu):
    x = _clustered(50_000, 64, 50, seed=3)
    runs = {dev: spherical_kmeans(x, 50, iterations=10, seed=0, device=dev) for dev in ("cpu", "gpu")}
    np.testing.assert_allclose(runs["gpu"].centroids, runs["cpu"].centroids, atol=1e-4)
    lc, sc = assign(x, runs["cpu"].centroids, device="cpu")
    lg, sg = assign(x, runs["cpu"].centroids, device="gpu")
    assert (lc == lg).mean() >= 0.999
    np.testing.assert_allclose(sg, sc, atol=1e-5)
