"""Benchmark: the copy-dedup kNN graph and k-means assignment on faiss GPUs against the CPU, same synthetic data.

Usage:
    python bench/faiss_gpu.py                    # 200k x 256-d float16 unit vectors, k = 64, 2000 centroids
    python bench/faiss_gpu.py --n 1000000 --threads 16

Rows: flat kNN graph (`knn.Searcher.search_self` over a slice of queries), IVF kNN graph (train + add + search),
and one Lloyd assignment (`kmeans.assign`). Each row reports seconds on CPU and GPU, the speed-up, and how many
result rows are identical between the two (see data_pipeline/core/faiss_gpu.py for why a few may differ). Without a
GPU-enabled faiss the GPU column says why and only the CPU is timed. Results are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.cluster.kmeans import assign  # noqa: E402
from data_pipeline.core import faiss_gpu  # noqa: E402
from data_pipeline.core.knn import KnnParams, Searcher  # noqa: E402


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), d)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20_000, help="query rows of the kNN graph rows timed")
    parser.add_argument("--centroids", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="faiss CPU threads (0 = all cores)")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    x = clustered(args.n, args.d)
    gpus = faiss_gpu.gpu_count()
    devices = ["cpu"] + (["gpu"] if gpus else [])
    print(f"faiss build: {faiss_gpu.check_single_faiss() or '?'}; GPUs seen by faiss: {gpus}; CPU threads {threads}")
    if not gpus:
        print("GPU rows skipped: this faiss has no GPU support or sees no GPU")
    rows = []
    q = min(args.queries, args.n)
    for kind in ("flat", "ivf"):
        res = {}
        for dev in devices:
            params = KnnParams(index=kind, device=dev, threads=threads, nprobe=32)
            build_s, searcher = timed(lambda p=params: Searcher(x, p))
            search_s, out = timed(lambda s=searcher: s.search_self(0, q, args.k))
            res[dev] = (build_s + search_s, out[1])
        rows.append((f"kNN graph {kind} ({q} queries, k={args.k})", res))
    cent = x[np.random.default_rng(1).choice(args.n, args.centroids, replace=False)].astype(np.float32)
    res = {}
    for dev in devices:
        sec, (labels, _) = timed(lambda d=dev: assign(x, cent, device=d))
        res[dev] = (sec, labels[:, None])
    rows.append((f"k-means assignment ({args.centroids} centroids)", res))
    print(f"\n{args.n} x {args.d}-d float16 vectors")
    print(f"{'workload':48} {'CPU s':>8} {'GPU s':>8} {'speed-up':>9} {'rows identical':>15}")
    for name, res in rows:
        cpu_s, cpu_out = res["cpu"]
        if "gpu" in res:
            gpu_s, gpu_out = res["gpu"]
            same = float((cpu_out == gpu_out).all(axis=1).mean())
            print(f"{name:48} {cpu_s:8.2f} {gpu_s:8.2f} {cpu_s / gpu_s:8.1f}x {same:15.4%}")
        else:
            print(f"{name:48} {cpu_s:8.2f} {'-':>8} {'-':>9} {'-':>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
