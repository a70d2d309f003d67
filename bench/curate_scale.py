"""Benchmark: every global curation stage's core at pool scale (1M, 2M, 4M; 10M opt-in), with measured growth.

Data, per size n (written once to `--workdir/<n>/` as float16 `.npy` files, read back as memory maps, the format the
stages read): 512-d unit vectors around n/100 gaussian centres (noise norm 1.5, so unrelated images of one centre
sit near cosine 0.3 like copy-detection descriptors of similar scenes), with planted near-copies:
- n/1000 copy pairs (copy = normalise(source + noise), cosine 0.74-0.98 > the 0.6 copy threshold);
- 64-bit perceptual hashes with n/1000 planted pairs within Hamming distance 1-4;
- an eval set of 1000 vectors, half of them copies of pool images (cosine > the 0.45 decontamination threshold);
- a seed set of 200 vectors, each a copy of one pool image (retrieval must return it among its 4 neighbours).

Stages (each in a fresh child process): wall time, peak RSS (the child's VmHWM: anonymous memory, shared libraries
and the memmap pages it touched) and the child's peak anonymous memory (sampled every 20 ms; i.e. without the
clean file pages the kernel can drop):
- near_dedup: `near_dedup.near_pairs` (Faiss multi-hash, exact) over the hashes; recall of planted pairs.
- copy_knn_pq8: copy_knn with `pq_fast_scan` off (8-bit PQ codes, the same bytes per vector), side by side with
  copy_knn's 4-bit fast-scan codes; the table's last lines give the ratios.
- copy_knn: `knn.Searcher` (index chosen by `--memory-budget-gb`, like copy_dedup) + the k = 64 self-kNN graph with
  exact re-rank; recall of planted copies (edge cos > 0.6 found), and the recall vs exact search on a seeded query
  sample that copy_dedup prints. `--query-sample Q` times Q random queries and extrapolates the all-query time
  linearly (marked `*` in the table); 0 runs the stage's own resumable `copy_dedup.self_pairs` over every row.
- decontaminate: the eval set against the pool (k = 64) through the copy_knn index (loaded, as the stage loads
  copy_dedup's file), `--decontaminate-nprobe` lists per eval image; planted recall and sampled recall vs exact.
- kmeans: `spherical_kmeans` trained on a sample (max points per centroid) + whole-pool `assign`.
- hkmeans: `hierarchical_kmeans` (levels, resampling steps, sampled training, every step re-assigns the pool).
- retrieve: seed set `sample` mode (block-wise exact search, k = 4), `cluster` mode assignment to the k-means
  centroids and a balanced hierarchical sample from the hkmeans levels; recall of planted seeds.

Usage:
    python bench/curate_scale.py --sizes 1M 2M 4M --workdir /tmp/scale --json scale.json
    python bench/curate_scale.py --sizes 100k 200k             # quick check
    python bench/curate_scale.py --sizes 10M --query-sample 20000   # opt-in: ~10 GiB of float16 vectors on disk

Growth exponent per stage: least-squares slope of log(wall time) (and log(peak RSS)) against log(n).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

STAGES = ("near_dedup", "copy_knn_pq8", "copy_knn", "decontaminate", "kmeans", "hkmeans", "retrieve")
KNN_GRAPH_STAGES = ("copy_knn_pq8", "copy_knn")
COPY_THRESHOLD, DECON_THRESHOLD = 0.6, 0.45
D = 512


def parse_size(text: str) -> int:
    """'1M' -> 1000000, '200k' -> 200000, '5000' -> 5000."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 1M, 200k or 5000")
    return int(float(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _copies(src: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """normalise(src + noise) with noise norm uniform in [lo, hi]: cosine 1/sqrt(1 + norm^2) to the source."""
    noise = _unit(rng.standard_normal(src.shape).astype(np.float32))
    return _unit(src + noise * rng.uniform(lo, hi, (len(src), 1)).astype(np.float32)).astype(np.float16)


def make_data(n: int, out: Path, seed: int = 0) -> dict:
    """Write pool.npy, hashes.npy, evals.npy, seeds.npy and planted.npz under `out` (skipped when present)."""
    meta_file = out / "data.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, n])
    n_centres = max(1, n // 100)
    centres = _unit(rng.standard_normal((n_centres, D)).astype(np.float32))
    pool = np.lib.format.open_memmap(out / "pool.tmp.npy", mode="w+", dtype=np.float16, shape=(n, D))
    for s in range(0, n, 1 << 16):
        b = min(1 << 16, n - s)
        x = centres[rng.integers(n_centres, size=b)] + rng.standard_normal((b, D), dtype=np.float32) * (1.5 / D**0.5)
        pool[s : s + b] = _unit(x)
    pairs = max(1, n // 1000)
    perm = rng.permutation(n)[: 2 * pairs]
    src, dst = np.sort(perm[:pairs]), perm[pairs:]
    pool[dst] = _copies(np.asarray(pool[src], np.float32), rng, 0.2, 0.9)  # cos 0.74 .. 0.98
    pool.flush()
    del pool
    os.replace(out / "pool.tmp.npy", out / "pool.npy")
    pool = np.load(out / "pool.npy", mmap_mode="r")
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    hashes ^= rng.integers(0, 2, size=n).astype(np.uint64)
    h_src, h_dst = np.sort(perm[:pairs]), perm[pairs:]
    flips = rng.integers(1, 5, size=pairs)
    for a, b, f in zip(h_src, h_dst, flips):
        mask = np.uint64(0)
        for bit in rng.choice(64, f, replace=False):
            mask |= np.uint64(1) << np.uint64(bit)
        hashes[b] = hashes[a] ^ mask
    np.save(out / "hashes.npy", hashes)
    n_eval, n_seed = 1000, 200
    e_src = np.sort(rng.choice(n, n_eval // 2, replace=False))
    evals = np.concatenate([_copies(np.asarray(pool[e_src], np.float32), rng, 0.2, 0.9),
                            _copies(centres[rng.integers(n_centres, size=n_eval // 2)], rng, 1.5, 1.5)])
    np.save(out / "evals.npy", evals)
    s_src = np.sort(rng.choice(n, n_seed, replace=False))
    np.save(out / "seeds.npy", _copies(np.asarray(pool[s_src], np.float32), rng, 0.2, 0.6))
    np.savez(out / "planted.npz", copy_a=src, copy_b=dst, hash_a=h_src, hash_b=h_dst, eval_src=e_src, seed_src=s_src)
    meta = {"n": n, "d": D, "centres": n_centres, "copy_pairs": pairs, "gen_s": round(time.perf_counter() - t0, 1),
            "pool_bytes": int(n * D * 2)}
    meta_file.write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------------- child stages


def _pair_recall(found_a: np.ndarray, found_b: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Share of planted pairs (a, b) among the found unordered pairs."""
    found = set(zip(np.minimum(found_a, found_b).tolist(), np.maximum(found_a, found_b).tolist()))
    return float(np.mean([(min(x, y), max(x, y)) in found for x, y in zip(a.tolist(), b.tolist())]))


def stage_near_dedup(d: Path, cfg: dict) -> dict:
    from data_pipeline.core.config import HashConfig
    from data_pipeline.dedup.near_dedup import near_pairs

    hashes = np.load(d / "hashes.npy")
    p = np.load(d / "planted.npz")
    i, j, _ = near_pairs(hashes, HashConfig(threshold=4, threads=cfg["threads"]))
    return {"pairs": int(i.size), "planted_recall": _pair_recall(i, j, p["hash_a"], p["hash_b"])}


def _params(cfg: dict, n: int, pq_fast_scan: bool = True):
    from data_pipeline.core.knn import KnnParams

    nlist = int(cfg["nlist_factor"] * n**0.5) if cfg["nlist_factor"] > 0 else 0
    return KnnParams(memory_budget_gb=cfg["memory_budget_gb"], nlist=nlist, threads=cfg["threads"],
                     flat_max=min(200_000, n - 1), pq_fast_scan=pq_fast_scan)


def stage_copy_knn_pq8(d: Path, cfg: dict) -> dict:
    """The kNN graph as before IVF-PQ fast-scan: 8-bit PQ codes (the same bytes), for the side-by-side ratio."""
    return stage_copy_knn(d, cfg, pq_fast_scan=False)


def stage_copy_knn(d: Path, cfg: dict, pq_fast_scan: bool = True) -> dict:
    from data_pipeline.core.knn import Searcher, drop_self, index_to_bytes, measure_recalls
    from data_pipeline.dedup.copy_dedup import self_pairs

    pool = np.load(d / "pool.npy", mmap_mode="r")
    p = np.load(d / "planted.npz")
    n, k = len(pool), 64
    params = _params(cfg, n, pq_fast_scan)
    floor = COPY_THRESHOLD - 0.05  # copy_dedup keeps the audit band below the threshold too
    out: dict = {}
    t0 = time.perf_counter()
    if cfg["query_sample"] <= 0:
        work = d / "copy_work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        a, b, s, searcher = self_pairs(pool, k, floor, params, work)
        out["search_s"] = round(time.perf_counter() - t0, 1)
        out["queries"] = n
        edge = s > COPY_THRESHOLD
        out["planted_recall"] = _pair_recall(a[edge], b[edge], p["copy_a"], p["copy_b"])
        out["edges"] = int(edge.sum())
        shutil.rmtree(work, ignore_errors=True)
    else:
        searcher = Searcher(pool, params)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        rows = np.sort(np.random.default_rng(1).choice(n, min(cfg["query_sample"], n), replace=False))
        t1 = time.perf_counter()
        for s0 in range(0, len(rows), 1 << 14):
            r = rows[s0 : s0 + (1 << 14)]
            drop_self(*searcher.search(pool[r], k + 1), r, k)
        sampled = time.perf_counter() - t1
        out["queries"] = int(len(rows))
        out["search_sample_s"] = round(sampled, 1)
        out["search_s"] = round(out["build_s"] + sampled * n / len(rows), 1)  # build + extrapolated all-query time
        # Planted copies: both endpoints query; an edge is found when either one returns the other above 0.6.
        ends = np.concatenate([p["copy_a"], p["copy_b"]])
        order = np.argsort(ends)
        sims, idx = drop_self(*searcher.search(pool[ends[order]], k + 1), ends[order], k)
        q = np.repeat(ends[order], k)
        ok = (idx.ravel() >= 0) & (sims.ravel() > COPY_THRESHOLD)
        out["planted_recall"] = _pair_recall(q[ok], idx.ravel()[ok], p["copy_a"], p["copy_b"])
    out["index"], out["nlist"], out["index_mib"] = searcher.kind, searcher.nlist, round(searcher.nbytes / 2**20, 1)
    t2 = time.perf_counter()
    if searcher.kind != "flat":
        edges, at_k = measure_recalls(pool, k, params, cfg["recall_sample"], 0, searcher=searcher,
                                      min_sims=(COPY_THRESHOLD, None))
        out["recall_edges"], out["recall_at_k"] = round(edges, 4), round(at_k, 4)
    else:
        out["recall_edges"] = out["recall_at_k"] = 1.0
    out["recall_s"] = round(time.perf_counter() - t2, 1)
    if pq_fast_scan:  # the index decontaminate loads, as copy_dedup's
        (d / "index.faiss").write_bytes(index_to_bytes(searcher))
    return out


def stage_decontaminate(d: Path, cfg: dict) -> dict:
    from data_pipeline.core.knn import measure_recalls, searcher_from_bytes

    pool = np.load(d / "pool.npy", mmap_mode="r")
    evals = np.load(d / "evals.npy", mmap_mode="r")
    p = np.load(d / "planted.npz")
    params = replace(_params(cfg, len(pool)), nprobe=cfg["decontaminate_nprobe"])  # as the stage searches
    t0 = time.perf_counter()
    searcher = searcher_from_bytes(pool, params, (d / "index.faiss").read_bytes())
    load = time.perf_counter() - t0
    sims, idx = searcher.search(evals, 64)
    search = time.perf_counter() - t0 - load
    planted = p["eval_src"]
    hit = (idx[: len(planted)] == planted[:, None]) & (sims[: len(planted)] > DECON_THRESHOLD)
    out = {"nprobe": params.nprobe, "index_load_s": round(load, 1), "search_s": round(search, 1),
           "queries": int(len(evals)),
           "matches": int((sims > DECON_THRESHOLD).sum()), "planted_recall": float(hit.any(axis=1).mean())}
    edges, at_k = 1.0, 1.0
    if searcher.kind != "flat":
        edges, at_k = measure_recalls(pool, 64, params, cfg["recall_sample"], 0, evals, searcher,
                                      (DECON_THRESHOLD, None))
    out["recall_edges"], out["recall_at_k"] = round(edges, 4), round(at_k, 4)
    return out


def stage_kmeans(d: Path, cfg: dict) -> dict:
    from data_pipeline.cluster.kmeans import assign, budget_points, set_threads, spherical_kmeans

    set_threads(cfg["threads"])
    pool = np.load(d / "pool.npy", mmap_mode="r")
    k = cfg["clusters"]
    t0 = time.perf_counter()
    res = spherical_kmeans(pool, k, iterations=cfg["iterations"], init="afkmc2", seed=0,
                           max_points_per_centroid=cfg["mppc"], max_points=budget_points(cfg["memory_budget_gb"], D))
    train = time.perf_counter() - t0
    labels, sims = assign(pool, res.centroids)
    np.save(d / "centroids.npy", res.centroids)
    np.save(d / "labels.npy", labels)
    sizes = np.bincount(labels, minlength=k)
    return {"clusters": k, "train_s": round(train, 1), "assign_s": round(time.perf_counter() - t0 - train, 1),
            "mean_cos": round(float(sims.mean()), 4), "empty": int((sizes == 0).sum())}


def stage_hkmeans(d: Path, cfg: dict) -> dict:
    from data_pipeline.cluster.kmeans import budget_points, hierarchical_kmeans, set_threads

    set_threads(cfg["threads"])
    pool = np.load(d / "pool.npy", mmap_mode="r")
    levels = hierarchical_kmeans(pool, cfg["levels"], iterations=cfg["iterations"], init="afkmc2", seed=0,
                                 resample_steps=cfg["resample_steps"], max_points_per_centroid=cfg["mppc"],
                                 max_points=budget_points(cfg["memory_budget_gb"], D))
    np.savez(d / "levels.npz", **{f"assign{i}": lv.assign for i, lv in enumerate(levels)},
             **{f"centroids{i}": lv.centroids for i, lv in enumerate(levels)})
    return {"levels": [len(lv.centroids) for lv in levels], "resample_steps": cfg["resample_steps"],
            "objective_l1": round(levels[0].objective, 1)}


def stage_retrieve(d: Path, cfg: dict) -> dict:
    from data_pipeline.cluster.kmeans import Level, assign, balanced_sample, set_threads
    from data_pipeline.core.knn import KnnParams, exact_search

    set_threads(cfg["threads"])
    pool = np.load(d / "pool.npy", mmap_mode="r")
    seeds = np.load(d / "seeds.npy")
    p = np.load(d / "planted.npz")
    t0 = time.perf_counter()
    sims, idx = exact_search(pool, seeds, 4, KnnParams(index="flat", threads=cfg["threads"]))
    sample_s = time.perf_counter() - t0
    recall = float((idx == p["seed_src"][:, None]).any(axis=1).mean())
    cent, labels = np.load(d / "centroids.npy"), np.load(d / "labels.npy")
    lab, _ = assign(seeds, cent)
    counts = np.bincount(lab, minlength=len(cent))
    chosen = np.flatnonzero(counts > 3)
    in_chosen = int(np.isin(labels, chosen).sum())
    z = np.load(d / "levels.npz")
    nl = sum(1 for key in z.files if key.startswith("assign"))
    levels = [Level(z[f"centroids{i}"], z[f"assign{i}"], np.zeros(0, np.float32)) for i in range(nl)]
    picked = balanced_sample(levels, len(pool) // 10, np.random.default_rng(0))
    return {"sample_s": round(sample_s, 1), "planted_recall": recall, "cluster_mode_pool_rows": in_chosen,
            "balanced": int(len(picked)), "total_s": round(time.perf_counter() - t0, 1)}


def _watch_anon(peak: list[int], stop: threading.Event) -> None:
    """Sample RssAnon (kB) every 20 ms: the kernel keeps a high-water mark for RSS as a whole only."""
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        stop.wait(0.02)


def child(stage: str, d: Path, cfg: dict) -> None:
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=_watch_anon, args=(peak, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    out = globals()[f"stage_{stage}"](d, cfg)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    # CPU seconds of the stage (all threads): on a shared, oversubscribed machine far steadier than wall time.
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = round(ru.ru_utime + ru.ru_stime - cpu0, 1)
    stop.set()
    watcher.join()
    out["peak_anon_mib"] = round(peak[0] / 1024, 1)
    with open("/proc/self/status") as f:  # this process's own high-water mark (exec started a fresh one)
        out["peak_rss_mib"] = round(next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024, 1)
    (d / f"result-{stage}.json").write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------------------- parent


def run_stage(stage: str, d: Path, cfg: dict) -> dict:
    """Run one stage in a fresh child. Its peak RSS is the child's own VmHWM: `ru_maxrss` of a child would also
    carry the parent's high-water mark from before the exec (Linux copies it into the child's counter)."""
    (d / f"result-{stage}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", stage, "--dir", str(d), "--cfg", json.dumps(cfg)])
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} at {d.name} failed with exit code {proc.returncode}")
    out = json.loads((d / f"result-{stage}.json").read_text())
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


def slope(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log n (None with fewer than two sizes)."""
    if len(ns) < 2 or min(ys) <= 0:
        return None
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


def stage_time(stage: str, r: dict) -> float:
    """The time that grows with the pool: for copy_knn the build + all-query search (extrapolated when sampled)."""
    return r["search_s"] if stage in KNN_GRAPH_STAGES else r["wall_s"]


def print_table(results: dict[int, dict], cfg: dict) -> dict:
    ns = sorted(results)
    print(f"\nGlobal stages, 512-d float16 memmaps, {cfg['threads']} threads; time s / peak RSS MiB (anon MiB) / "
          f"planted recall / recall vs exact (edges above threshold, sampled)")
    head = f"{'stage':<14}" + "".join(f"{f'n={n:,}':>44}" for n in ns) + f"{'time exp':>10}{'RSS exp':>9}{'cpu exp':>9}"
    print(head)
    growth = {}
    for stage in STAGES:
        cells = []
        for n in ns:
            r = results[n].get(stage)
            if r is None:
                cells.append(f"{'-':>44}")
                continue
            t = stage_time(stage, r)
            star = "*" if stage in KNN_GRAPH_STAGES and r.get("queries", n) < n else ""
            pr = r.get("planted_recall")
            rec = r.get("recall_edges")
            cell = (f"{t:.0f}{star} / {r['peak_rss_mib']:.0f} ({r['peak_anon_mib']:.0f}) / "
                    f"{'-' if pr is None else f'{pr:.3f}'} / {'-' if rec is None else f'{rec:.3f}'}")
            cells.append(f"{cell:>44}")
        have = [n for n in ns if stage in results[n]]
        te = slope(have, [stage_time(stage, results[n][stage]) for n in have])
        me = slope(have, [results[n][stage]["peak_anon_mib"] for n in have])
        with_cpu = [n for n in have if "cpu_s" in results[n][stage] and stage not in KNN_GRAPH_STAGES]
        ce = slope(with_cpu, [results[n][stage]["cpu_s"] for n in with_cpu]) if len(with_cpu) == len(have) else None
        growth[stage] = {"time": te, "cpu_time": ce, "anon_memory": me}
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{stage:<14}" + "".join(cells) + f"{fmt(te):>10}{fmt(me):>9}{fmt(ce):>9}")
    print("* copy_knn: index build + all-query time extrapolated linearly from the timed query sample.")
    both = [n for n in ns if all(stage in results[n] for stage in KNN_GRAPH_STAGES)]
    for n in both:
        old, new = (results[n][stage] for stage in KNN_GRAPH_STAGES)
        per_query = [r["search_sample_s"] / r["queries"] * 1e3 for r in (old, new) if "search_sample_s" in r]
        query_note = (f", per query {per_query[0]:.2f} -> {per_query[1]:.2f} ms ({per_query[0] / per_query[1]:.1f}x)"
                      if len(per_query) == 2 else "")
        ratio = stage_time("copy_knn", old) / stage_time("copy_knn", new)
        print(f"n={n:,}: kNN graph, 8-bit PQ -> fast-scan: build {old.get('build_s', '-')} -> "
              f"{new.get('build_s', '-')} s{query_note}, graph {ratio:.1f}x faster; edge recall "
              f"{old['recall_edges']} -> {new['recall_edges']}, recall@64 {old.get('recall_at_k')} -> "
              f"{new.get('recall_at_k')}, planted {old['planted_recall']:.3f} -> {new['planted_recall']:.3f}")
    print("time exp / RSS exp / cpu exp: log-log slopes of wall time, peak anonymous memory and CPU seconds.")
    return growth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/curate_scale"))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-budget-gb", type=float, default=0.45,
                   help="kNN index budget (copy_dedup.memory_budget_gb; 0.45 picks IVF-PQ from 1M to 10M, the index "
                        "a 10M pool gets under the default 4.0) and k-means training-copy budget")
    p.add_argument("--nlist-factor", type=float, default=1.0,
                   help="IVF lists = factor * sqrt(n); 0 = production auto (~4 sqrt(n), 16x the coarse training work)")
    p.add_argument("--query-sample", type=int, default=5000, help="timed kNN-graph queries (0 = every pool row)")
    p.add_argument("--decontaminate-nprobe", type=int, default=256,
                   help="IVF lists per eval image (decontaminate.nprobe; the kNN graph probes 32)")
    p.add_argument("--recall-sample", type=int, default=100, help="queries compared with exact search")
    p.add_argument("--clusters", type=int, default=256, help="flat k-means clusters")
    p.add_argument("--levels", type=int, nargs="+", default=[256, 16], help="hierarchical k-means levels")
    p.add_argument("--resample-steps", type=int, default=1)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--mppc", type=int, default=64, help="k-means training sample: max points per centroid")
    p.add_argument("--keep-data", action="store_true", help="keep the generated vectors and the copy_knn index "
                   "(default: delete after); a later --stages decontaminate run searches that index")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--table", type=Path, nargs="+", default=None,
                   help="only print the table (and write --json) from these result files, merged")
    p.add_argument("--child", choices=STAGES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.dir, json.loads(args.cfg))
        return
    if args.table:
        merged: dict = {"results": {}, "data": {}}
        for f in args.table:
            part = json.loads(f.read_text())
            merged["config"] = part["config"]
            for n, stages in part["results"].items():
                merged["results"].setdefault(int(n), {}).update(stages)
            merged["data"].update({int(n): v for n, v in part["data"].items()})
        merged["growth"] = print_table(merged["results"], merged["config"])
        if args.json:
            args.json.write_text(json.dumps(merged, indent=1) + "\n")
        return
    cfg = {"threads": args.threads, "memory_budget_gb": args.memory_budget_gb, "nlist_factor": args.nlist_factor,
           "query_sample": args.query_sample, "decontaminate_nprobe": args.decontaminate_nprobe,
           "recall_sample": args.recall_sample, "clusters": args.clusters,
           "levels": args.levels, "resample_steps": args.resample_steps, "iterations": args.iterations,
           "mppc": args.mppc}
    results: dict[int, dict] = {}
    data: dict[int, dict] = {}
    for n in args.sizes:
        d = args.workdir / str(n)
        data[n] = make_data(n, d)
        print(f"n={n:,}: data {data[n]['pool_bytes'] / 2**30:.2f} GiB float16 ({data[n]['gen_s']} s)", flush=True)
        results[n] = {}
        needs = {"decontaminate": "copy_knn", "retrieve": "hkmeans"}
        for stage in STAGES:
            kept_index = stage == "decontaminate" and (d / "index.faiss").is_file()  # a --keep-data run's
            if stage not in args.stages or (stage in needs and needs[stage] not in results[n] and not kept_index):
                continue
            if stage == "retrieve" and "kmeans" not in results[n]:
                continue
            results[n][stage] = r = run_stage(stage, d, cfg)
            print(f"  {stage:<14} {json.dumps(r)}", flush=True)
            if args.json:  # after every stage, so that an interrupted run keeps what it measured
                args.json.write_text(json.dumps({"config": cfg, "data": data, "results": results}, indent=1) + "\n")
        if not args.keep_data:
            shutil.rmtree(d, ignore_errors=True)
    growth = print_table(results, cfg)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "data": data, "results": results, "growth": growth},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
