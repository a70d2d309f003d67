"""Cosine kNN over L2-normalised embeddings with Faiss: exact flat search or IVF / IVF-PQ plus an exact re-rank.

Cosine similarity is the inner product because every vector is L2-normalised upstream. Faiss takes C-contiguous
float32 only, so float16 (possibly memory-mapped) arrays are converted one block at a time (`vectors.blocks`, which
also unmaps each block's pages): memory stays bounded by the block sizes plus the index itself. Index bytes per
vector (`index_bytes`): flat 4d, IVF-Flat 4d + 8, IVF-SQ8 d + 8, IVF-PQ pq_m + 8 (the 8 are the stored id).
Under index=auto the kind is the most exact one whose index fits `memory_budget_gb`, so a 10M x 512 pool (20 GB as
float32) gets a compressed index instead of a float32 copy; the exact re-rank reads the candidates' stored vectors.

IVF-PQ on the CPU stores its `pq_m` bytes per vector as 2 * pq_m 4-bit sub-quantizers searched by Faiss' SIMD
fast-scan kernels (`pq_fast_scan`; André, Kermarrec, Le Scouarnec, "Cache locality is not enough", VLDB 2015) rather
than pq_m 8-bit ones: on 1M-4M x 512 pools, same code size, the index search 7x and the build 2-5x faster, the
whole query with its re-rank 2.3x, and a higher recall@64 after the re-rank (bench/curate_scale.py). GPUs search the
8-bit form (Faiss has no GPU fast-scan).

Every similarity returned is recomputed exactly from the stored vectors (`exact_scores`), whatever index produced the
candidates, and rows are ordered by (similarity desc, index asc). So the same pair gets the same float32 score from
any index kind and from either endpoint, and outputs are deterministic for a fixed thread count and seed.

With `device` auto (GPUs present) or gpu, indexes are built and searched on every GPU (`faiss_gpu`): the candidates
come from the GPUs, the scores are still the CPU's exact ones (see `faiss_gpu` for what can differ).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import faiss
import numpy as np

from data_pipeline.core import faiss_gpu
from data_pipeline.core.vectors import blocks, release, to_f32

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "ivfsq8", "ivfpq")
# Most exact first: index=auto takes the first kind whose index fits the memory budget.
APPROX_KINDS = ("ivf", "ivfsq8", "ivfpq")
# Upper bound on the float32 buffer the re-rank gathers at once ([queries, candidates, d]).
RERANK_BYTES = 64 << 20


@dataclass(frozen=True)
class KnnParams:
    """Index choice and search knobs; the copy_dedup config section carries the same names.

    Attributes:
        index: auto (flat up to `flat_max` base vectors, else the first of ivf, ivfsq8, ivfpq whose index fits
            `memory_budget_gb`), flat (exact), ivf (IVF-Flat), ivfsq8 (IVF, 8-bit scalar quantizer), ivfpq (IVF-PQ).
        flat_max: largest base searched exactly under index=auto.
        memory_budget_gb: the most the index may hold under index=auto (GiB; `index_bytes`).
        nlist: IVF lists; 0 = auto (about 4 * sqrt(n), at most n / 39 and 65536).
        nprobe: IVF lists visited per query.
        pq_m: IVF-PQ code bytes per vector (must divide d): pq_m 8-bit sub-quantizers, or 2 * pq_m 4-bit ones
            under `pq_fast_scan`.
        pq_fast_scan: IVF-PQ built on the CPU uses Faiss' 4-bit fast-scan codes (when 2 * pq_m divides d and the
            training sample has >= 39 points per 4-bit centroid); GPUs always build the 8-bit form.
        rerank: approximate candidates fetched per query before the exact re-rank keeps the top k.
        threads: Faiss OpenMP threads (fixed, because float reductions depend on it).
        seed: seeds the IVF training sample and Faiss k-means.
        query_block: queries searched at once.
        base_block: base vectors per flat index in `exact_search`.
        device: auto (faiss GPUs when present), cpu or gpu.
    """

    index: str = "auto"
    flat_max: int = 200_000
    memory_budget_gb: float = 4.0
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 32
    pq_fast_scan: bool = True
    rerank: int = 256
    threads: int = 2
    seed: int = 0
    query_block: int = 4096
    base_block: int = 1 << 18
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in faiss_gpu.DEVICES:
            raise ValueError(f"knn device must be one of {list(faiss_gpu.DEVICES)}, got {self.device!r}")
        if self.index not in KINDS:
            raise ValueError(f"knn index must be one of {list(KINDS)}, got {self.index!r}")
        if min(self.nprobe, self.pq_m, self.threads, self.query_block, self.base_block) < 1 or self.nlist < 0:
            raise ValueError("knn nprobe, pq_m, threads, query_block and base_block must be >= 1, nlist >= 0")
        if not self.memory_budget_gb > 0:
            raise ValueError(f"knn memory_budget_gb must be > 0, got {self.memory_budget_gb}")


def knn_params(section: Any, **overrides: Any) -> KnnParams:
    """KnnParams from any config-like object (e.g. `cfg.copy_dedup`): attributes with matching names are used."""
    values = {f.name: getattr(section, f.name) for f in fields(KnnParams) if hasattr(section, f.name)}
    values.update(overrides)
    return KnnParams(**values)


def _as_params(params: Any) -> KnnParams:
    return params if isinstance(params, KnnParams) else knn_params(params)


def index_bytes(kind: str, n: int, d: int, pq_m: int = 32, nlist: int = 0) -> int:
    """Bytes a filled index of `kind` holds for n vectors of d dims: codes + 8-byte ids + coarse centroids."""
    per_vector = {"flat": 4 * d, "ivf": 4 * d + 8, "ivfsq8": d + 8, "ivfpq": pq_m + 8}[kind]
    coarse = 0 if kind == "flat" else 4 * d * (nlist or auto_nlist(n))
    return n * per_vector + coarse


def resolve_kind(n: int, d: int, params: KnnParams) -> str:
    """The index kind used for a base of `n` vectors of `d` dims.

    Raises:
        ValueError: under index=auto when not even IVF-PQ fits `memory_budget_gb`.
    """
    if params.index != "auto":
        return params.index
    budget = params.memory_budget_gb * (1 << 30)
    if n <= params.flat_max and index_bytes("flat", n, d) <= budget:
        return "flat"
    for kind in APPROX_KINDS:
        if index_bytes(kind, n, d, params.pq_m, params.nlist) <= budget:
            return kind
    need = index_bytes("ivfpq", n, d, params.pq_m, params.nlist) / (1 << 30)
    raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is below the smallest index for {n} x {d} "
                     f"vectors (IVF-PQ with pq_m={params.pq_m}: {need:.2f} GiB); raise it or lower pq_m")


def auto_nlist(n: int) -> int:
    """IVF list count for `n` vectors: ~4 sqrt(n), with >= 39 training points per list (Faiss' minimum)."""
    return int(max(1, min(65536, int(4 * math.sqrt(n)), n // 39)))


def exact_scores(base: np.ndarray, queries: np.ndarray, cand: np.ndarray, threads: int = 1) -> np.ndarray:
    """Exact inner products of each query with its candidates.

    Args:
        base: float16/float32 [n, d] (a memmap is fine: only the candidate rows are read, in sorted order).
        queries: float32 [m, d].
        cand: int64 [m, r] base indices, -1 = no candidate.
        threads: torch threads for the gather and the float16 -> float32 conversion (exact: any count gives the
            same bits).

    Returns:
        float32 [m, r]; -inf where cand is -1.
    """
    # torch loads here, not with the module: curation workers re-import the CLI's modules under a memory cap that a
    # CUDA build of torch's address-space mappings would exceed (see data_pipeline/embed/embed.py)
    import torch

    m, r = cand.shape
    out = np.full((m, r), -np.inf, dtype=np.float32)
    if m == 0 or r == 0:
        return out
    d = base.shape[1]
    step = min(m, max(1, RERANK_BYTES // (r * d * 4)))
    # Buffers reused across steps: fresh 64 MB temporaries cost more in page faults than the arithmetic, and numpy's
    # float16 -> float32 cast is ~10x slower than torch's vectorised one (the re-rank was half the kNN graph's time).
    stored = np.empty((step * r, d), base.dtype)  # the distinct candidate rows, as stored
    gathered = torch.empty((step * r, d), dtype=torch.from_numpy(stored[:0]).dtype)
    rows = gathered if gathered.dtype == torch.float32 else torch.empty((step * r, d), dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in range(0, m, step):
            c = cand[s : s + step]
            b = len(c)
            valid = c >= 0
            uniq, inv = np.unique(np.where(valid, c, 0), return_inverse=True)
            np.take(base, uniq, axis=0, out=stored[: len(uniq)])
            torch.index_select(torch.from_numpy(stored[: len(uniq)]), 0, torch.from_numpy(inv.reshape(-1)),
                               out=gathered[: b * r])
            if rows is not gathered:
                rows[: b * r].copy_(gathered[: b * r])
            # einsum without optimize runs a fixed C loop: the same pair gives the same bits from either endpoint.
            scores = np.einsum("brd,bd->br", rows[: b * r].numpy().reshape(b, r, d), to_f32(queries[s : s + step]))
            out[s : s + step] = np.where(valid, scores, -np.inf)
    finally:
        torch.set_num_threads(previous)
    return out


def top_k(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (similarity desc, index asc); missing entries (-1 / -inf) go last.

    Args:
        sims: float32 [m, r]; idx: int64 [m, r].

    Returns:
        (float32 [m, k], int64 [m, k]), padded with -inf / -1 when r < k.
    """
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.hstack([sims, np.full((sims.shape[0], pad), -np.inf, np.float32)])
        idx = np.hstack([idx, np.full((idx.shape[0], pad), -1, np.int64)])
    sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def _rerank(
    base: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    return top_k(exact_scores(base, queries, cand, threads), cand.astype(np.int64), k)


def exact_search(base: np.ndarray, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute force over blocks of `base_block` base vectors (bounded memory: one float32 block).

    Args:
        base: float16/float32 [n, d]; queries: [m, d]; k: neighbours per query.

    Returns:
        (sims float32 [m, k], idx int64 [m, k]) as in `knn_search`.
    """
    p = _as_params(params if params is not None else KnnParams())
    faiss.omp_set_num_threads(p.threads)
    m = queries.shape[0]
    gpu = faiss_gpu.use_gpu(p.device)
    best_s = np.full((m, k), -np.inf, np.float32)
    best_i = np.full((m, k), -1, np.int64)
    for bs, block in blocks(base, p.base_block):
        index = None
        if gpu:
            index = faiss_gpu.to_gpus(faiss.IndexFlatIP(base.shape[1]), block.nbytes)
            index.add(block)
        kk = min(k, block.shape[0])
        for qs in range(0, m, p.query_block):
            q = to_f32(queries[qs : qs + p.query_block])
            # On the CPU, the brute-force kernel IndexFlatIP.search runs, on the block itself: no index copy.
            d, i = index.search(q, kk) if gpu else faiss.knn(q, block, kk, faiss.METRIC_INNER_PRODUCT)
            i = np.where(i >= 0, i + bs, -1)
            best_s[qs : qs + len(d)], best_i[qs : qs + len(d)] = top_k(
                np.hstack([best_s[qs : qs + len(d)], d]), np.hstack([best_i[qs : qs + len(d)], i]), k
            )
        del index, block  # before the next block is read: peak is one float32 block
    out_s, out_i = np.empty_like(best_s), np.empty_like(best_i)
    for qs in range(0, m, p.query_block):
        q = to_f32(queries[qs : qs + p.query_block])
        out_s[qs : qs + len(q)], out_i[qs : qs + len(q)] = _rerank(base, q, best_i[qs : qs + len(q)], k, p.threads)
    return out_s, out_i


class Searcher:
    """A built index over `base` that answers exact-scored kNN queries.

    Attributes:
        kind: flat, ivf or ivfpq.
        nlist: IVF lists (0 for flat).
        index: the Faiss index (on the GPUs when `gpu`).
        gpu: whether the index lives on GPUs.
    """

    def __init__(self, base: np.ndarray, params: Any, index: faiss.Index | None = None) -> None:
        """Build the index (train on a seeded sample for IVF kinds, add in blocks), or wrap a loaded `index`."""
        self.base = base
        self.params = _as_params(params)
        n, d = base.shape
        self.kind = resolve_kind(n, d, self.params)
        self.gpu = faiss_gpu.use_gpu(self.params.device)
        faiss.omp_set_num_threads(self.params.threads)
        if index is not None:
            self.nlist = int(getattr(faiss.try_extract_index_ivf(index), "nlist", 0)) if self.kind != "flat" else 0
            if self.gpu and isinstance(faiss.downcast_index(index), faiss.IndexIVFFastScan):
                # Faiss has no GPU fast-scan: an index built on a CPU is searched there (the same candidates)
                log.warning("the loaded IVF-PQ index uses 4-bit fast-scan codes, which Faiss cannot search on "
                            "GPUs: it is searched on the CPU")
                self.gpu = False
            self.index = faiss_gpu.to_gpus(index, self._filled_bytes(n, d)) if self.gpu else index
            self._set_nprobe()
            return
        self.nlist = 0
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        else:
            self.index = self._train_ivf(base)
        if self.gpu:  # trained (IVF) or empty (flat) on the CPU, filled on the GPUs
            self.index = faiss_gpu.to_gpus(self.index, self._filled_bytes(n, d))
            self._set_nprobe()
        for _, block in blocks(base, self.params.base_block):
            self.index.add(block)

    def _filled_bytes(self, n: int, d: int) -> int:
        """Size of the filled index (vectors or codes plus ids), for replicate-or-shard and the stage stats."""
        return index_bytes(self.kind, n, d, self.params.pq_m, self.nlist)

    @property
    def nbytes(self) -> int:
        """Bytes the filled index holds (`index_bytes`)."""
        return self._filled_bytes(*self.base.shape)

    def _set_nprobe(self) -> None:
        if self.kind != "flat":
            if self.gpu:
                faiss_gpu.set_nprobe(self.index, min(self.params.nprobe, self.nlist))
            else:
                self.index.nprobe = min(self.params.nprobe, self.nlist)

    def cpu_index(self) -> faiss.Index:
        """The index in CPU form (a copy when it lives on GPUs), e.g. to serialise it."""
        return faiss_gpu.to_cpu(self.index) if self.gpu else self.index

    def fast_scan_fits(self, d: int, n_train: int) -> bool:
        """Whether IVF-PQ is built with 4-bit fast-scan codes: on the CPU, 2 * pq_m dividing d, and >= 39 training
        points for each of the 16 centroids per sub-quantizer."""
        p = self.params
        return p.pq_fast_scan and not faiss_gpu.use_gpu(p.device) and d % (2 * p.pq_m) == 0 and n_train >= 16 * 39

    def _train_ivf(self, base: np.ndarray) -> faiss.Index:
        n, d = base.shape
        p = self.params
        self.nlist = p.nlist if p.nlist > 0 else auto_nlist(n)
        if self.nlist > n:
            raise ValueError(f"IVF nlist={self.nlist} exceeds the {n} base vectors; lower copy_dedup.nlist")
        n_train = min(n, max(64 * self.nlist, 16384))
        rng = np.random.default_rng(p.seed)
        sample = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else np.arange(n)
        train = to_f32(base[sample])
        release(base)
        quantizer = faiss.IndexFlatIP(d)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        elif self.kind == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, self.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            if d % p.pq_m:
                raise ValueError(f"copy_dedup.pq_m={p.pq_m} must divide the embedding dimension {d}")
            if self.fast_scan_fits(d, n_train):
                index = faiss.IndexIVFPQFastScan(quantizer, d, self.nlist, 2 * p.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
            else:
                # Faiss wants >= 39 training points per PQ centroid; small pools get smaller codebooks (the exact
                # re-rank makes up for coarser codes).
                nbits = int(max(1, min(8, math.floor(math.log2(max(2, n_train // 39))))))
                index = faiss.IndexIVFPQ(quantizer, d, self.nlist, p.pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.seed = p.seed
        index.cp.seed = p.seed
        if faiss_gpu.use_gpu(p.device):
            # The coarse k-means (the expensive part of training) assigns on the GPUs; PQ training stays on the CPU.
            self._clustering = faiss_gpu.to_gpus(faiss.IndexFlatIP(d), self.nlist * d * 4)
            index.clustering_index = self._clustering
        index.train(train)
        self._quantizer = quantizer  # keep the Python object alive as long as the index
        self.index = index
        self._set_nprobe()
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k base vectors per query by cosine, exactly scored.

        Args:
            queries: float16/float32 [m, d], L2-normalised.
            k: neighbours per query.

        Returns:
            (sims float32 [m, k], idx int64 [m, k]); rows sorted by (sim desc, idx asc), padded with -inf / -1.
        """
        faiss.omp_set_num_threads(self.params.threads)
        m, n = queries.shape[0], self.base.shape[0]
        fetch = k if self.kind == "flat" else max(k, self.params.rerank)
        fetch = max(1, min(fetch, n))
        sims = np.empty((m, k), np.float32)
        idx = np.empty((m, k), np.int64)
        for s in range(0, m, self.params.query_block):
            q = to_f32(queries[s : s + self.params.query_block])
            _, cand = self.index.search(q, fetch)
            sims[s : s + len(q)], idx[s : s + len(q)] = _rerank(self.base, q, cand, k, self.params.threads)
        return sims, idx

    def search_self(self, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN of base rows [start, stop) among the other base rows (self matches dropped).

        Returns:
            (sims float32 [stop - start, k], idx int64 [stop - start, k]).
        """
        sims, idx = self.search(self.base[start:stop], k + 1)
        return drop_self(sims, idx, np.arange(start, stop, dtype=np.int64), k)


def drop_self(sims: np.ndarray, idx: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its k+1 results (or the last result if self was not returned).

    Args:
        sims, idx: [m, k + 1] results; query_ids: int64 [m] base index of each query.

    Returns:
        (float32 [m, k], int64 [m, k]).
    """
    is_self = idx == query_ids[:, None]
    # A stable sort on the flag moves the self column to the end and keeps the others in order.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def knn_search(base: np.ndarray, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine kNN of `queries` in `base`.

    Args:
        base: float16/float32 [n, d], L2-normalised rows.
        queries: float16/float32 [m, d], L2-normalised rows.
        k: neighbours per query.
        params: KnnParams or a config-like object with the same attribute names (e.g. `cfg.copy_dedup`).

    Returns:
        (sims float32 [m, k], idx int64 [m, k]); exact cosines, rows sorted by (sim desc, idx asc), padded with
        -inf / -1 when fewer than k neighbours exist.
    """
    return Searcher(base, params if params is not None else KnnParams()).search(queries, k)


def knn_self(base: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """kNN of every base row among the other base rows (self matches dropped); shapes as in `knn_search`."""
    searcher = Searcher(base, params if params is not None else KnnParams())
    return searcher.search_self(0, base.shape[0], k)


def measure_recalls(
    base: np.ndarray,
    k: int,
    params: Any,
    sample: int,
    seed: int = 0,
    queries: np.ndarray | None = None,
    searcher: Searcher | None = None,
    min_sims: Sequence[float | None] = (None,),
) -> list[float]:
    """recall@k of the configured search against exact search, on a seeded sample of queries, for each of
    `min_sims` from one exact and one approximate search of the sample (the exact search reads the whole base, the
    expensive part at scale).

    Args:
        base: float16/float32 [n, d].
        k: neighbours compared.
        params: KnnParams or config-like.
        sample: queries drawn (without replacement, sorted) from `queries`, or from `base` when None (then each
            query's own row is left out of both result lists, as in a self-search).
        searcher: a Searcher already built on `base` (saves rebuilding the index).
        min_sims: per recall, count only exact neighbours with similarity > min_sim (e.g. the dedup edge
            threshold: most of a k = 64 list is unrelated images whose order matters to no one); None counts all.

    Returns:
        Per min_sim, |approx top-k ∩ exact top-k| / |exact top-k| summed over the sampled queries; 1.0 when
        nothing to count.
    """
    p = _as_params(params)
    src = base if queries is None else queries
    m = min(sample, src.shape[0])
    if m == 0 or base.shape[0] == 0:
        return [1.0] * len(min_sims)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(src.shape[0], m, replace=False))
    q = to_f32(src[pick])
    searcher = searcher if searcher is not None else Searcher(base, p)
    exact_p = replace(p, index="flat")
    if queries is None:  # self-search: compare the neighbours other than the query itself
        approx = drop_self(*searcher.search(q, k + 1), pick, k)[1]
        exact_s, exact = drop_self(*exact_search(base, q, k + 1, exact_p), pick, k)
    else:
        approx = searcher.search(q, k)[1]
        exact_s, exact = exact_search(base, q, k, exact_p)
    found = np.array([np.isin(e, a[a >= 0]) for a, e in zip(approx, exact)]).reshape(exact.shape)
    out = []
    for min_sim in min_sims:
        counted = (exact >= 0) if min_sim is None else (exact >= 0) & (exact_s > min_sim)
        total = int(counted.sum())
        out.append(float((found & counted).sum() / total) if total else 1.0)
    return out


def index_to_bytes(searcher: Searcher) -> bytes:
    """Serialised Faiss index (to checkpoint an expensive IVF build)."""
    return faiss.serialize_index(searcher.cpu_index()).tobytes()


def searcher_from_bytes(base: np.ndarray, params: Any, data: bytes) -> Searcher:
    """Searcher over `base` around an index serialised by `index_to_bytes`."""
    return Searcher(base, params, index=faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))
