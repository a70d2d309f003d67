"""Spherical k-means on L2-normalised vectors with faiss, k-means++ / AFK-MC² seeding, hierarchical k-means with
resampling (Vo et al. 2024, ssl-data-curation: ideas only) and balanced hierarchical sampling.

Every random choice goes through a seeded `numpy.random.Generator`; a k-means run can checkpoint its centroids,
iteration and RNG state after each iteration and resume from them bitwise-identically (same faiss thread count).
Shapes: n points, d dims, k clusters.

`device` (auto / cpu / gpu, see `data_pipeline.core.faiss_gpu`): the nearest-centroid assignment, which is where
Lloyd iterations spend their time, runs on every GPU (centroids replicated, points split) when GPUs are used; the
seeding and centroid updates stay on the CPU. GPU and CPU labels agree except for points within float32 rounding
of two centroids, so centroids agree to ~1e-5 rather than bitwise.

`Slicing` spreads the assignment over slices of points (`executors.run_slices`: in this process or one SLURM job
array per Lloyd iteration). Each slice task reads its points and the iteration's centroid file from disk and writes,
atomically, its labels, similarities and per-cluster float32 sums and counts; the driver adds the slices' sums in
float64 in slice order, so the centroids depend on the slice size but not on where the slices ran. With one slice
(the pool fits `slice_rows`) the sums are exactly the unsliced ones.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse

from data_pipeline.core import artifacts, faiss_gpu
from data_pipeline.core.executors import SliceRunner, SliceTask
from data_pipeline.core.vectors import blocks, release

BLOCK = 65536
INITS = ("kmeans++", "afkmc2", "random")


def set_threads(n: int) -> None:
    """Fix faiss's OpenMP thread count (float reductions, hence results, depend on it); 0 leaves the default."""
    if n > 0:
        faiss.omp_set_num_threads(n)


def _normalized_blocks(x: np.ndarray, block: int = BLOCK):
    """(offset, float32 L2-normalised block) over `x`; a memmap's pages are released after each block."""
    for s, rows in blocks(x, block):
        faiss.normalize_L2(rows)
        yield s, rows


def load_normalized(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [m, d] normalised copy of `x` (all rows, or the sorted row indices `rows`), read block by block."""
    if rows is not None:
        out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        for s in range(0, len(rows), BLOCK):
            out[s : s + BLOCK] = x[rows[s : s + BLOCK]]
            release(x)
        faiss.normalize_L2(out)
        return out
    out = np.empty(x.shape, dtype=np.float32)  # filled in place: peak memory is the copy plus one block
    for s, block in _normalized_blocks(x):
        out[s : s + len(block)] = block
    return out


def budget_points(memory_budget_gb: float, d: int) -> int:
    """Largest k-means training set whose float32 copy fits `memory_budget_gb` GiB."""
    return max(1, int(memory_budget_gb * (1 << 30)) // (4 * d))


def cap_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` (sorted indices) or, when longer than `cap` > 0, a seeded sorted subsample of `cap` of them."""
    if 0 < cap < len(rows):
        return np.sort(rng.choice(rows, cap, replace=False))
    return rows


def assign(x: np.ndarray, centroids: np.ndarray, block: int = BLOCK,
           device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product, block by block.

    Args:
        x: [n, d] vectors (any float dtype, memmap allowed); rows are L2-normalised per block.
        centroids: float32 [k, d] unit rows.
        device: auto, cpu or gpu (faiss GPUs).

    Returns:
        labels int64 [n] and cosine similarities float32 [n] to the assigned centroid.
    """
    cent = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(cent.shape[1])
    if faiss_gpu.use_gpu(device):
        index = faiss_gpu.to_gpus(index, cent.nbytes)
    index.add(cent)
    n = len(x)
    labels = np.empty(n, dtype=np.int64)
    sims = np.empty(n, dtype=np.float32)
    for s, rows in _normalized_blocks(x, block):
        sim, lab = index.search(rows, 1)
        labels[s : s + len(rows)], sims[s : s + len(rows)] = lab[:, 0], sim[:, 0]
    return labels, sims


class Checkpointer:
    """Per-run checkpoints in `work_dir/<tag>.npz`: centroids, completed iterations and RNG state, written atomically.

    Subclass and override `save` to observe progress (e.g. to stop a run part-way in tests).
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)

    def path(self, tag: str) -> Path:
        """File of run `tag`."""
        return self.work_dir / f"{tag}.npz"

    def save(self, tag: str, centroids: np.ndarray, iteration: int, rng: np.random.Generator) -> None:
        """Atomically replace run `tag`'s checkpoint."""
        buf = io.BytesIO()
        state = json.dumps(rng.bit_generator.state, sort_keys=True)
        np.savez(buf, centroids=centroids, iteration=np.int64(iteration), rng_state=np.array(state))
        artifacts.write_bytes_atomic(self.path(tag), buf.getvalue())

    def load(self, tag: str) -> tuple[np.ndarray, int, dict] | None:
        """(centroids, completed iterations, RNG state) of run `tag`, or None when it has no checkpoint."""
        p = self.path(tag)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return z["centroids"].copy(), int(z["iteration"]), json.loads(str(z["rng_state"]))


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float64 [n, m] squared euclidean distances of rows `x` [n, d] to rows `c` [m, d].

    Goes through faiss so that its thread setting governs the BLAS call (numpy's own BLAS pool would oversubscribe
    a shared machine).
    """
    return np.maximum(faiss.pairwise_distances(x, np.ascontiguousarray(c, dtype=np.float32)), 0).astype(np.float64)


def init_kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator, candidates: int = 0) -> np.ndarray:
    """Greedy k-means++ seeding on unit rows: each step draws `candidates` points by D² sampling (default
    2 + ln k, as scikit-learn and faiss do) and keeps the one that lowers the potential Σ min d² the most.

    Args:
        x: float32 [n, d] unit rows in memory.

    Returns:
        int64 [k] indices of the seeds in `x`.
    """
    n = len(x)
    trials = candidates or 2 + int(np.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d2 = _sq_dist(x, x[chosen[:1]])[:, 0]
    for c in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] <= 0:
            # Every point already coincides with a seed: any choice is as good (an empty cluster gets re-seeded).
            cand = rng.integers(n, size=trials)
        else:
            cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        # [n, trials] distances in one matrix product; potential of each candidate added to the current seeds.
        dc = np.minimum(d2[:, None], _sq_dist(x, x[cand]))
        best = int(np.argmin(dc.sum(axis=0)))
        chosen[c] = cand[best]
        d2 = dc[:, best].copy()
    return chosen


def init_afkmc2(x: np.ndarray, k: int, rng: np.random.Generator, chain: int = 50, batch: int = 64) -> np.ndarray:
    """AFK-MC² seeding (Bachem et al., NeurIPS 2016): k-means++ approximated by Metropolis-Hastings chains of length
    `chain` with the proposal q(x) = ½ d²(x, c₁)/Σd² + ½/n, so each seed costs O(chain · k · d) instead of O(n · d).

    The proposal is fixed, so the candidates of `batch` consecutive chains are drawn up front and their distances to
    the seeds chosen before the batch come from one large search (efficient BLAS instead of k tiny ones); distances
    to seeds chosen inside the batch are added with a small product per chain. Same algorithm, just batched.

    Args:
        x: float32 [n, d] unit rows in memory.

    Returns:
        int64 [k] indices of the seeds in `x`.
    """
    n, d = x.shape
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d2 = _sq_dist(x, x[chosen[:1]])[:, 0]
    total = d2.sum()
    q = 0.5 * d2 / total + 0.5 / n if total > 0 else np.full(n, 1.0 / n)
    cum = np.cumsum(q)
    cum /= cum[-1]
    index = faiss.IndexFlatIP(d)
    index.add(x[chosen[:1]])
    c = 1
    while c < k:
        b = min(batch, k - c)
        cand = np.minimum(np.searchsorted(cum, rng.random(b * chain), side="right"), n - 1).reshape(b, chain)
        u = rng.random((b, chain))
        sim, _ = index.search(x[cand.ravel()], 1)
        before = sim[:, 0].reshape(b, chain)  # best similarity to the seeds chosen before this batch
        for i in range(b):
            best = before[i]
            if i:
                # einsum runs a plain C loop: no BLAS thread pool to wake for a [chain, i] product.
                best = np.maximum(best, np.einsum("cd,sd->cs", x[cand[i]], x[chosen[c : c + i]]).max(axis=1))
            dc = np.maximum(2.0 - 2.0 * best.astype(np.float64), 0.0)
            qc = q[cand[i]]
            cur = 0
            for j in range(1, chain):
                # Accept y over x with probability min(1, d²(y) q(x) / (d²(x) q(y))).
                if u[i, j] * dc[cur] * qc[j] < dc[j] * qc[cur]:
                    cur = j
            chosen[c + i] = cand[i, cur]
        index.add(x[chosen[c : c + b]])
        c += b
    return chosen


def _slice_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float32 sums [k, d] and int64 counts [k] of the rows of `x` by label."""
    n = len(labels)
    # Sums as a sparse one-hot [k, n] @ x [n, d] product: one sequential pass (deterministic), ~10x faster than a
    # sort + reduceat; float32 accumulation is ample for directions that are normalised next.
    onehot = scipy.sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x, dtype=np.float32), np.bincount(labels, minlength=k).astype(np.int64)


def _centroids(sums: np.ndarray, counts: np.ndarray, x: np.ndarray, labels: np.ndarray,
               sims: np.ndarray) -> tuple[np.ndarray, int]:
    """Spherical centroid update from float64 sums: L2-normalise; empty clusters re-seeded deterministically.

    Empty clusters take, in cluster order, the points farthest from their centroid (lowest similarity, then lowest
    index) among clusters with more than one member, so the run stays seed-free and reproducible.

    Returns:
        float32 [k, d] centroids and the number of re-seeded clusters.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        donors = np.flatnonzero(counts[labels] > 1)
        far = donors[np.lexsort((donors, sims[donors]))][: empty.size]
        sums[empty[: far.size]] = x[far]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    cent = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return cent, int(empty.size)


def _update(x: np.ndarray, labels: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Spherical centroid update over all of `x` at once (one slice): per-cluster mean, normalised.

    Returns:
        float32 [k, d] centroids and the number of re-seeded clusters.
    """
    sums, counts = _slice_sums(x, labels, k)
    return _centroids(sums.astype(np.float64), counts, x, labels, sims)


@dataclass
class Slicing:
    """How to spread assignments over slices of points (see the module docstring).

    Attributes:
        run: runs slice tasks (`executors.run_here`, or `executors.slice_runner` of a curate config).
        work_dir: holds the points of in-memory inputs, each iteration's centroid file and the slice outputs.
        slice_rows: points per slice (per SLURM array task).
        threads: faiss threads in each slice (results depend on it, so the driver's setting).
    """

    run: SliceRunner
    work_dir: Path
    slice_rows: int = 1 << 18
    threads: int = 0

    def points(self, x: np.ndarray, name: str) -> str:
        """A .npy file holding `x` for the slice tasks: its own file when `x` maps one, else written once."""
        found = artifacts.npy_file(x)
        if found is not None:
            return found
        path = self.work_dir / f"{name}-points.npy"
        if not path.is_file():
            artifacts.write_npy_atomic(path, np.asarray(x))
        return str(path)

    def drop(self, points: str) -> None:
        """Delete a points file `points` wrote (never an input's own file)."""
        path = Path(points)
        if path.parent == self.work_dir and path.name.endswith("-points.npy"):
            path.unlink(missing_ok=True)

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) of each slice of n points."""
        return [(s, min(n, s + self.slice_rows)) for s in range(0, n, self.slice_rows)]


def lloyd_slice(points: str, rows: np.ndarray | None, start: int, stop: int, cent_file: str, device: str,
                threads: int, out_path: str) -> None:
    """One slice task of a Lloyd iteration: labels, similarities, float32 sums and counts of points [start, stop)
    of `load_normalized(points file, all rows)` (`rows`: the slice's own rows of the file, when the run trains on a
    sample), written atomically as one .npz. Normalisation is per row, so the slice's points are the driver's bit
    for bit."""
    set_threads(threads)
    x = np.load(points, mmap_mode="r")
    xs = load_normalized(x, rows) if rows is not None else load_normalized(x[start:stop])
    cent = np.load(cent_file)
    labels, sims = assign(xs, cent, device=device)
    sums, counts = _slice_sums(xs, labels, len(cent))
    buf = io.BytesIO()
    np.savez(buf, labels=labels, sims=sims, sums=sums, counts=counts)
    artifacts.write_bytes_atomic(Path(out_path), buf.getvalue())


def assign_slice(points: str, start: int, stop: int, cent_file: str, device: str, threads: int,
                 out_path: str) -> None:
    """One slice task of a whole-input assignment: labels and similarities of points [start, stop) (rows
    normalised by `assign` as in the unsliced call), written atomically as one .npz."""
    set_threads(threads)
    labels, sims = assign(np.load(points, mmap_mode="r")[start:stop], np.load(cent_file), device=device)
    buf = io.BytesIO()
    np.savez(buf, labels=labels, sims=sims)
    artifacts.write_bytes_atomic(Path(out_path), buf.getvalue())


def _centroid_file(folder: Path, centroids: np.ndarray) -> str:
    path = folder / "centroids.npy"
    if not path.is_file():
        artifacts.write_npy_atomic(path, np.ascontiguousarray(centroids, dtype=np.float32))
    return str(path)


def lloyd_step_sliced(slicing: Slicing, points: str, rows: np.ndarray | None, xt: np.ndarray, cent: np.ndarray,
                      folder: Path, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One Lloyd iteration over slices of `xt` (= `load_normalized(points, rows)`, held by the driver for the
    empty-cluster re-seeding), resumable through `folder`.

    Returns:
        (labels int64 [n], sims float32 [n], new centroids float32 [k, d], re-seeded clusters).
    """
    k = len(cent)
    cent_file = _centroid_file(folder, cent)
    tasks = [SliceTask(i, lloyd_slice, (points, None if rows is None else rows[a:b], a, b, cent_file, device,
                                        slicing.threads),
                       str(folder / f"slice-{i:06d}.npz"))
             for i, (a, b) in enumerate(slicing.bounds(len(xt)))]
    slicing.run(tasks, f"k-means {folder.name}")
    labels, sims = [], []
    sums = np.zeros((k, xt.shape[1]), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for t in tasks:  # slice order: the float64 sum is the same whoever computed the slices
        with np.load(t.out_path) as z:
            labels.append(z["labels"])
            sims.append(z["sims"])
            sums += z["sums"].astype(np.float64)
            counts += z["counts"]
    lab, sim = np.concatenate(labels), np.concatenate(sims)
    new, reseeded = _centroids(sums, counts, xt, lab, sim)
    return lab, sim, new, reseeded


def assign_all(x: np.ndarray, centroids: np.ndarray, device: str = "auto", slicing: Slicing | None = None,
               tag: str = "assign") -> tuple[np.ndarray, np.ndarray]:
    """`assign` of every row of `x`, in slices through `slicing` when given (then resumable under
    `slicing.work_dir/<tag>-assign/`, removed once read).

    Returns:
        labels int64 [n] and similarities float32 [n].
    """
    if slicing is None:
        return assign(x, centroids, device=device)
    folder = slicing.work_dir / f"{tag}-assign"
    points = slicing.points(x, folder.name)
    cent_file = _centroid_file(folder, centroids)
    tasks = [SliceTask(i, assign_slice, (points, a, b, cent_file, device, slicing.threads),
                       str(folder / f"slice-{i:06d}.npz"))
             for i, (a, b) in enumerate(slicing.bounds(len(x)))]
    slicing.run(tasks, f"k-means {folder.name}")
    labels, sims = [], []
    for t in tasks:
        with np.load(t.out_path) as z:
            labels.append(z["labels"])
            sims.append(z["sims"])
    shutil.rmtree(folder, ignore_errors=True)
    slicing.drop(points)
    if not tasks:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(sims)


@dataclass
class KMeansResult:
    """Outcome of one k-means run: centroids float32 [k, d] and the objective Σ(1 - cos) per iteration run."""

    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    reseeded: int = 0


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    init: str = "kmeans++",
    seed: int | Sequence[int] = 0,
    max_points_per_centroid: int = 0,
    max_points: int = 0,
    train_rows: np.ndarray | None = None,
    checkpoint: Checkpointer | None = None,
    tag: str = "kmeans",
    afkmc2_chain: int = 50,
    device: str = "auto",
    slicing: Slicing | None = None,
) -> KMeansResult:
    """Lloyd's algorithm on the unit sphere: assign by inner product (faiss IndexFlatIP), centroid = normalised mean.

    Args:
        x: [n, d] vectors (float16/float32, memmap allowed), L2-normalised on load.
        k: clusters; must be <= the number of training points.
        iterations: Lloyd iterations (no early stop, so runs are comparable and resumable).
        init: "kmeans++", "afkmc2" or "random" (k distinct points).
        seed: numpy Generator seed (an int or a sequence, e.g. [seed, level, step]).
        max_points_per_centroid: train on a seeded sample of at most this many points per centroid (0 = all).
        max_points: and of at most this many points in all (0 = no cap), which bounds the float32 training copy.
        train_rows: train on exactly these sorted rows of `x` instead of a sample (the caps above do not apply).
        checkpoint: where to save/resume `tag` after the seeding and after every iteration.
        device: where the assignment step runs (auto, cpu, gpu).
        slicing: run each iteration's assignment and sums in slices (here or as SLURM arrays); None = one block
            in this process (the same result as one slice).

    Returns:
        A KMeansResult (objective covers only the iterations run in this call).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    rng = np.random.default_rng(seed)
    n = len(x)
    rows = train_rows
    m = min(max_points_per_centroid * k if max_points_per_centroid > 0 else n, max_points if max_points > 0 else n)
    if rows is None and m < n:
        rows = np.sort(rng.choice(n, m, replace=False))
    xt = load_normalized(x, rows)
    if k < 1 or k > len(xt):
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k}, points={len(xt)}")
    saved = checkpoint.load(tag) if checkpoint is not None else None
    if saved is not None:
        cent, start, state = saved
        rng.bit_generator.state = state
    else:
        if init == "kmeans++":
            seeds = init_kmeanspp(xt, k, rng)
        elif init == "afkmc2":
            seeds = init_afkmc2(xt, k, rng, afkmc2_chain)
        else:
            seeds = np.sort(rng.choice(len(xt), k, replace=False))
        cent, start = xt[seeds].copy(), 0
        if checkpoint is not None:
            checkpoint.save(tag, cent, 0, rng)
    result = KMeansResult(cent)
    points = slicing.points(x, tag) if slicing is not None and start < iterations else ""
    for it in range(start, iterations):
        if slicing is None:
            labels, sims = assign(xt, cent, device=device)
            cent_new, reseeded = _update(xt, labels, sims, k)
        else:
            folder = slicing.work_dir / f"{tag}-it{it:04d}"
            labels, sims, cent_new, reseeded = lloyd_step_sliced(slicing, points, rows, xt, cent, folder, device)
        result.objective.append(float(np.sum(1.0 - sims.astype(np.float64))))
        cent = cent_new
        result.reseeded += reseeded
        if checkpoint is not None:
            checkpoint.save(tag, cent, it + 1, rng)
        if slicing is not None:  # the checkpoint now holds what the slice files were for
            shutil.rmtree(folder, ignore_errors=True)
    if points:
        slicing.drop(points)
    result.centroids = cent
    return result


def cluster_csr(labels: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Members grouped by cluster, each cluster ordered by similarity to its centroid (closest first), then index.

    Args:
        labels: int64 [n] cluster of each point; sims: float32 [n] similarity to it.

    Returns:
        offsets int64 [k + 1] and members int64 [n]: cluster c is members[offsets[c]:offsets[c + 1]].
    """
    members = np.lexsort((np.arange(len(labels)), -sims.astype(np.float64), labels)).astype(np.int64)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(labels, minlength=k), out=offsets[1:])
    return offsets, members


@dataclass
class Level:
    """One level of a hierarchy: centroids float32 [k, d]; assign int64 [n_in] (input -> cluster); sims float32
    [n_in]. Level 1's inputs are the data points, level L's are level L-1's clusters."""

    centroids: np.ndarray
    assign: np.ndarray
    sims: np.ndarray
    resample_size: int = 0  # r used by the resampling steps; 0 when none ran
    objective: float = 0.0  # Σ(1 - cos) of the inputs to their final centroids


def closest_per_cluster(labels: np.ndarray, sims: np.ndarray, k: int, r: int) -> np.ndarray:
    """Sorted indices of the min(|C|, r) members of each cluster closest to its centroid (balanced proxy set)."""
    offsets, members = cluster_csr(labels, sims, k)
    rank = np.arange(len(members)) - offsets[labels[members]]
    return np.sort(members[rank < r])


def hierarchical_kmeans(
    x: np.ndarray,
    levels: Sequence[int],
    *,
    iterations: int = 20,
    init: str = "kmeans++",
    seed: int = 0,
    resample_steps: int = 10,
    resample_size: int = 0,
    max_points_per_centroid: int = 0,
    max_points: int = 0,
    checkpoint: Checkpointer | None = None,
    device: str = "auto",
    slicing: Slicing | None = None,
) -> list[Level]:
    """Bottom-up hierarchical k-means with resampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised
    Learning: A Clustering-Based Approach"; official `ssl-data-curation/src/hierarchical_kmeans_gpu.py`).

    Level 1 clusters `x` into levels[0] clusters, level L clusters level L-1's centroids into levels[L-1]. After each
    level's k-means, `resample_steps` times: take the r points closest to each centroid (r = resample_size, or half
    the mean cluster size when 0), re-fit k-means from a fresh seeding on that flatter proxy set, and re-assign the
    whole level input. Skipped when r <= 1 or the proxy set has fewer than k points. Cluster counts are capped at the
    level's input size.

    Returns:
        One Level per entry of `levels`, finest first.
    """
    out: list[Level] = []
    inputs = x
    for li, k_req in enumerate(levels, start=1):
        n_in = len(inputs)
        k = min(int(k_req), n_in)
        tag = f"level{li}"
        res = spherical_kmeans(inputs, k, iterations=iterations, init=init, seed=[seed, li, 0],
                               max_points_per_centroid=max_points_per_centroid, max_points=max_points,
                               checkpoint=checkpoint, tag=f"{tag}_step0", device=device, slicing=slicing)
        labels, sims = assign_all(inputs, res.centroids, device, slicing, f"{tag}_step0")
        r = resample_size if resample_size > 0 else int(round(n_in / k / 2))
        done = 0
        for step in range(1, resample_steps + 1):
            if r <= 1:
                break
            proxy = closest_per_cluster(labels, sims, k, r)
            if len(proxy) < k:
                break
            proxy = cap_rows(proxy, max(max_points, k) if max_points else 0, np.random.default_rng([seed, li, step, 1]))
            # The proxy rows of `inputs` themselves, not a copy of them passed as a new input: one float32 copy.
            res = spherical_kmeans(inputs, k, iterations=iterations, init=init, train_rows=proxy,
                                   seed=[seed, li, step], checkpoint=checkpoint, tag=f"{tag}_step{step}",
                                   device=device, slicing=slicing)
            labels, sims = assign_all(inputs, res.centroids, device, slicing, f"{tag}_step{step}")
            done = step
        objective = float(np.sum(1.0 - sims.astype(np.float64)))
        out.append(Level(res.centroids, labels, sims, r if done else 0, objective))
        inputs = res.centroids
    return out


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Split `target` over groups as evenly as their sizes allow (water-filling, as in the official
    `ssl-data-curation/src/hierarchical_sampling.py`).

    Finds the largest cap c with Σ min(c, size) <= target; groups smaller than the cap give everything, the others c,
    and a seeded random subset of the latter c + 1 to absorb the remainder.

    Args:
        sizes: int64 [m] group sizes.

    Returns:
        int64 [m] per-group counts, each <= its size, summing to min(target, Σ sizes).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    m = len(sizes)
    if sizes.sum() <= target:
        return sizes.copy()
    order = np.argsort(sizes, kind="stable")
    s = sizes[order]
    before = np.concatenate([[0], np.cumsum(s)[:-1]])
    # Group j (in ascending size) is taken whole iff capping every group >= j at s[j] still fits the target.
    full = int(np.count_nonzero(before + s * (m - np.arange(m)) <= target))
    rest = target - int(before[full])
    cap, extra = divmod(rest, m - full)
    out = np.empty(m, dtype=np.int64)
    out[order[:full]] = s[:full]
    out[order[full:]] = cap
    if extra:
        out[rng.choice(order[full:], extra, replace=False)] += 1
    return out


def balanced_sample(levels: Sequence[Level], target: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced hierarchical sampling (Vo et al. 2024; multiplier 1 of the official `hierarchical_sampling.py`):
    split `target` evenly across the top level's clusters by water-filling, recursively down to level 1, then draw
    each finest cluster's share uniformly at random.

    Returns:
        int64 [min(target, n)] sorted indices of level-1 inputs (data points), without repetition.
    """
    flat = [np.bincount(levels[0].assign, minlength=len(levels[0].centroids)).astype(np.int64)]
    for lv in levels[1:]:
        flat.append(np.bincount(lv.assign, weights=flat[-1], minlength=len(lv.centroids)).astype(np.int64))
    targets = water_fill(flat[-1], target, rng)
    for li in range(len(levels) - 1, 0, -1):
        parents = levels[li].assign
        children = np.argsort(parents, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=len(flat[li])))])
        child_t = np.zeros(len(flat[li - 1]), dtype=np.int64)
        for c in np.flatnonzero(targets):
            kids = children[offsets[c] : offsets[c + 1]]
            child_t[kids] = water_fill(flat[li - 1][kids], int(targets[c]), rng)
        targets = child_t
    labels = levels[0].assign
    # A random key per point: taking the first `target` points of each cluster in key order is a uniform draw.
    key = rng.random(len(labels))
    order = np.lexsort((key, labels))
    starts = np.concatenate([[0], np.cumsum(flat[0])[:-1]])
    rank = np.arange(len(order)) - starts[labels[order]]
    return np.sort(order[rank < targets[labels[order]]])

