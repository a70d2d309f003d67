"""Benchmark: spherical k-means and kNN (IVF vs exact flat) at pool scale, on random-but-clustered vectors.

Data: `--n` x `--d` float16 unit vectors around `n/100` gaussian centres (the stored pool format).
(a) spherical k-means (data_pipeline.cluster.kmeans) with `n/100` clusters, `--iterations` Lloyd iterations:
    seeding time, time per iteration, the final whole-pool assignment, objective.
(b) kNN k=64 (data_pipeline.core.knn): IVF build + search at several nprobe vs exact flat search on `--queries` fresh
    queries from the same distribution; recall@k against the exact result.

Usage:
    python bench/curate_scale.py                  # 1M x 384, 10k clusters, 10 iterations (target < 10 min on 2 cores)
    python bench/curate_scale.py --n 100000       # quick check: 100k x 384, 1k clusters

Measured (shared 2-core box, other jobs running, faiss-cpu 1.15.1, 2 threads, AFK-MC²):
    --n 1000000 --max-points-per-centroid 32: seeding 42 s, 40.5 s/iteration, train 447 s, whole-pool assignment
        94 s, total 541 s; kNN k=64, 1000 queries: flat 21.5 s; IVF4000 build 170 s, nprobe 16: 1.1 s, recall 1.0.
    --n 200000 --max-points-per-centroid 100 --faiss: train 57 s vs faiss.Kmeans 43 s on the same job.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.cluster.kmeans import Checkpointer, assign, set_threads, spherical_kmeans
from data_pipeline.core.knn import KnnParams, Searcher, exact_search


def make_data(n: int, d: int, centres: int, noise: float, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 [n, d] pool and float16 [queries, d] queries: unit centres + gaussian noise of norm ~`noise`,
    L2-normalised, generated block by block."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float16)
        for s in range(0, m, 1 << 16):
            b = min(1 << 16, m - s)
            x = c[rng.integers(centres, size=b)] + rng.standard_normal((b, d), dtype=np.float32) * (noise / d**0.5)
            out[s : s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(queries)


class Clock(Checkpointer):
    """A real checkpointer that also stamps the time of every save (seeding done, then each iteration)."""

    def __init__(self, work_dir: Path) -> None:
        super().__init__(work_dir)
        self.stamps: list[float] = []

    def save(self, tag, centroids, iteration, rng) -> None:
        self.stamps.append(time.perf_counter())
        super().save(tag, centroids, iteration, rng)


def bench_kmeans(x: np.ndarray, k: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(Path(tmp))
        t0 = time.perf_counter()
        res = spherical_kmeans(x, k, iterations=args.iterations, init=args.init, seed=0,
                               max_points_per_centroid=args.max_points_per_centroid, checkpoint=clock)
        train = time.perf_counter() - t0
    t1 = time.perf_counter()
    labels, sims = assign(x, res.centroids)
    assign_s = time.perf_counter() - t1
    sizes = np.bincount(labels, minlength=k)
    per_iter = np.diff(clock.stamps)
    return {
        "clusters": k, "iterations": args.iterations, "init": args.init,
        "train_points": min(len(x), args.max_points_per_centroid * k) if args.max_points_per_centroid else len(x),
        "seeding_s": round(clock.stamps[0] - t0, 1), "iteration_s": round(float(per_iter.mean()), 1),
        "train_s": round(train, 1), "assign_pool_s": round(assign_s, 1), "total_s": round(train + assign_s, 1),
        "mean_cos": round(float(sims.mean()), 4), "empty": int((sizes == 0).sum()), "max_size": int(sizes.max()),
    }


def bench_faiss_kmeans(x: np.ndarray, k: int, args: argparse.Namespace) -> dict:
    """The same job with faiss.Kmeans (spherical, same init and sample size), as a yardstick on the same machine."""
    import faiss

    inits = {"afkmc2": faiss.ClusteringInitMethod_AFK_MC2, "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
             "random": faiss.ClusteringInitMethod_RANDOM}
    xt = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(xt)
    mppc = args.max_points_per_centroid or len(xt) // k + 1
    km = faiss.Kmeans(x.shape[1], k, niter=args.iterations, spherical=True, max_points_per_centroid=mppc, seed=0)
    km.cp.init_method = inits[args.init]
    t0 = time.perf_counter()
    km.train(xt)
    train = time.perf_counter() - t0
    _, labels = km.index.search(xt, 1)
    return {"train_s": round(train, 1), "empty": int((np.bincount(labels[:, 0], minlength=k) == 0).sum())}


def bench_knn(x: np.ndarray, q: np.ndarray, args: argparse.Namespace) -> list[dict]:
    k = args.k
    t0 = time.perf_counter()
    _, exact = exact_search(x, q, k, KnnParams(index="flat", threads=args.threads))
    rows = [{"index": "flat (exact)", "build_s": 0.0, "search_s": round(time.perf_counter() - t0, 2), "recall": 1.0}]
    t0 = time.perf_counter()
    searcher = Searcher(x, KnnParams(index="ivf", nlist=args.nlist, threads=args.threads))
    build = time.perf_counter() - t0
    for nprobe in args.nprobe:
        searcher.index.nprobe = min(nprobe, searcher.nlist)
        t0 = time.perf_counter()
        _, approx = searcher.search(q, k)
        search = time.perf_counter() - t0
        recall = np.mean([np.isin(e, a).mean() for a, e in zip(approx, exact)])
        rows.append({"index": f"ivf{searcher.nlist} nprobe={nprobe}", "build_s": round(build, 1),
                     "search_s": round(search, 2), "recall": round(float(recall), 4)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (default n/100)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--init", default="afkmc2", choices=["afkmc2", "kmeans++", "random"])
    p.add_argument("--max-points-per-centroid", type=int, default=256, help="train on a sample (0 = all points)")
    p.add_argument("--noise", type=float, default=0.6, help="noise norm around each unit centre")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = knn.auto_nlist)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", choices=["kmeans", "knn"], default=None)
    p.add_argument("--faiss", action="store_true", help="also time faiss.Kmeans on the same job")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    set_threads(args.threads)
    k = args.clusters or max(1, args.n // 100)
    t0 = time.perf_counter()
    x, q = make_data(args.n, args.d, max(1, args.n // 100), args.noise, args.queries, seed=0)
    print(f"data: {args.n} x {args.d} float16, {args.n // 100} centres, {time.perf_counter() - t0:.1f} s; "
          f"threads={args.threads}", flush=True)
    out: dict = {"n": args.n, "d": args.d, "threads": args.threads}
    if args.skip != "kmeans":
        km = bench_kmeans(x, k, args)
        out["kmeans"] = km
        print("\n(a) spherical k-means")
        for key, value in km.items():
            print(f"  {key:<16} {value}")
        if args.faiss:
            out["faiss_kmeans"] = fk = bench_faiss_kmeans(x, k, args)
            print(f"  faiss.Kmeans     train_s {fk['train_s']} (same init, sample and iterations), empty {fk['empty']}")
    if args.skip != "knn":
        rows = bench_knn(x, q, args)
        out["knn"] = rows
        print(f"\n(b) kNN k={args.k}, {args.queries} queries")
        print(f"  {'index':<24} {'build_s':>8} {'search_s':>9} {'recall@k':>9}")
        for r in rows:
            print(f"  {r['index']:<24} {r['build_s']:>8} {r['search_s']:>9} {r['recall']:>9}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
