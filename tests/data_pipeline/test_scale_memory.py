"""Bounded memory of the global stages: index choice by memory budget, block-wise memmap passes whose resident memory
does not grow with the pool, capped k-means training copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.cluster import kmeans
from data_pipeline.core.config import load_config
from data_pipeline.core.knn import KnnParams, Searcher, index_bytes, resolve_kind

GIB = 1 << 30


@pytest.mark.parametrize("n,budget,kind", [
    (100_000, 4.0, "flat"),        # within flat_max and 200 MB as float32
    (1_000_000, 4.0, "ivf"),       # IVF-Flat 2.06 GB fits
    (4_000_000, 4.0, "ivfsq8"),    # IVF-Flat 8.2 GB does not, 8-bit codes (2.1 GB) do
    (10_000_000, 4.0, "ivfpq"),    # SQ8 5.2 GB does not, PQ32 codes (0.4 GB) do
    (100_000, 0.1, "ivfsq8"),      # a small budget pushes even a flat-sized pool to codes
    (1_000_000, 0.45, "ivfpq"),
])
def test_auto_index_follows_memory_budget(n, budget, kind):
    params = KnnParams(memory_budget_gb=budget)
    assert resolve_kind(n, 512, params) == kind
    assert index_bytes(kind, n, 512, params.pq_m) <= budget * GIB
    # The chosen kind is the most exact that fits: every more exact kind is over budget.
    kinds = ["flat", "ivf", "ivfsq8", "ivfpq"]
    for finer in kinds[1 : kinds.index(kind)]:
        assert index_bytes(finer, n, 512, params.pq_m) > budget * GIB
    assert resolve_kind(n, 512, KnnParams(index="ivf", memory_budget_gb=budget)) == "ivf"  # explicit kinds stay


def test_budget_below_every_index_is_a_clear_error():
    with pytest.raises(ValueError, match=r"memory_budget_gb=0.01 .*\(IVF-PQ"):
        resolve_kind(10_000_000, 512, KnnParams(memory_budget_gb=0.01))
    for key in ("copy_dedup.memory_budget_gb", "cluster.memory_budget_gb"):
        with pytest.raises(ValueError, match=key):
            load_config(None, [f"{key}=0"])
    assert load_config(None, ["copy_dedup.index=ivfsq8"]).copy_dedup.index == "ivfsq8"


def test_searcher_reports_its_index_bytes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    s = Searcher(x, KnnParams(memory_budget_gb=0.0005, flat_max=100, nlist=16, pq_m=8, threads=1))
    assert s.kind == "ivfsq8"  # IVF-Flat would need 4000 * (256 + 8) B = 1.06 MB > 0.54 MB; SQ8 0.29 MB fits
    assert s.nbytes == index_bytes("ivfsq8", 4000, 64, 8, 16)


# A child process so that the peak resident set (VmHWM, reset just before the pass) belongs to the pass alone.
_PASS = r"""
import json, sys
import numpy as np
from data_pipeline.cluster.kmeans import assign
from data_pipeline.core.knn import KnnParams, exact_search
from data_pipeline.core.vectors import blocks

path, what = sys.argv[1], sys.argv[2]
x = np.load(path, mmap_mode="r")
cent = np.eye(16, x.shape[1], dtype=np.float32)
queries = np.ascontiguousarray(x[:8], dtype=np.float32)
# One-time costs before the measurement, not the pass's: torch (the re-rank's float16 cast) loads and starts its
# thread pool on a first, tiny search.
exact_search(np.eye(16, x.shape[1], dtype=np.float16), queries[:1], 1, KnnParams(threads=1))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
if what == "assign":
    assign(x, cent, block=8192)
elif what == "exact_search":
    exact_search(x, queries, 4, KnnParams(base_block=8192, threads=1))
elif what == "blocks":
    sum(float(b[:, 0].sum()) for _, b in blocks(x, 8192))
else:  # the same pass without releasing the pages: the control that shows the measurement can see growth
    sum(float(np.asarray(x[s : s + 8192], np.float32)[:, 0].sum()) for s in range(0, len(x), 8192))
print(json.dumps({"grew_kib": status("VmHWM") - before}))
"""


def _pass_growth(path: Path, what: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PASS, str(path), what], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_kib"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_blockwise_memmap_pass_memory_does_not_grow_with_n(tmp_path):
    d = 128
    sizes = {"small": 50_000, "large": 400_000}  # 12.8 MB and 102 MB of float16
    files = {}
    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        arr = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n, d))
        for s in range(0, n, 50_000):
            arr[s : s + 50_000] = rng.standard_normal((min(50_000, n - s), d)).astype(np.float16)
        arr.flush()
        del arr
        files[name] = tmp_path / f"{name}.npy"
    file_growth_kib = (sizes["large"] - sizes["small"]) * d * 2 // 1024
    # Control: a pass that keeps its pages mapped grows by about the extra file size.
    control = _pass_growth(files["large"], "control") - _pass_growth(files["small"], "control")
    assert control > 0.8 * file_growth_kib
    for what in ("blocks", "assign", "exact_search"):
        small, large = _pass_growth(files["small"], what), _pass_growth(files["large"], what)
        # What may differ: assign's outputs (12 bytes per vector, 4 MB here) and allocator slack of a block or two
        # (glibc raises its mmap threshold after the first freed block); the 90 MB of extra input must not count.
        assert large - small < 0.25 * file_growth_kib, (what, small, large)


def test_kmeans_training_copies_are_capped(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float16)
    loaded: list[int] = []
    real = kmeans.load_normalized

    def spy(arr, rows=None):
        out = real(arr, rows)
        loaded.append(len(out))
        return out

    monkeypatch.setattr(kmeans, "load_normalized", spy)
    kmeans.spherical_kmeans(x, 8, iterations=2, init="random", max_points=500)
    assert loaded == [500]
    loaded.clear()
    # Level 1 trains on 600 points (cap), its resampling proxy sets (~1500 points: half of each cluster) are cut to
    # 600 as well; level 2 clusters the 8 level-1 centroids (then proxy sets of 2 per cluster). One float32 copy per
    # k-means run: the proxy set is not copied once more inside the run.
    kmeans.hierarchical_kmeans(x, [8, 2], iterations=2, init="random", resample_steps=2, max_points=600)
    assert loaded == [600, 600, 600, 8, 4, 4]
    loaded.clear()
    kmeans.hierarchical_kmeans(x, [8], iterations=2, init="random", resample_steps=1)
    assert loaded[0] == 3000 and 600 < loaded[1] < 3000 and len(loaded) == 2  # uncapped: all, then the proxy set
    assert kmeans.budget_points(4.0, 512) == 2 * 1024 * 1024
